"""Streaming out of transformers' generate(): a streamer that forwards token ids to a queue,
and a stopping criterion that ends generation when a request is cancelled."""

from __future__ import annotations

import queue
import threading

END = object()  # put on the queue after the last tokens


class QueueStreamer:
    """A transformers streamer that forwards generated token ids to a queue.

    generate() first puts the prompt, which is skipped; ``end`` is idempotent so the
    worker can always call it, even after generate() raised.
    """

    def __init__(self, tokens: queue.Queue, end: object = None) -> None:
        self.tokens = tokens
        self.end_marker = end if end is not None else END
        self.prompt_seen = False
        self.ended = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens.put(value.reshape(-1).tolist())

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.tokens.put(self.end_marker)


def cancel_criteria(cancel: threading.Event):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])
