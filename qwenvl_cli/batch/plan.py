"""`qvl batch` planning: which requests decode together, and how many at once. Pure; no torch.

Requests that share sampling options (``GenerationParams.batch_key``) can be decoded as one
left-padded batch. Within such a group the requests are sorted by a length proxy (videos,
images, characters of text) so that prompts of similar length share a batch and little of
the batch is padding. ``auto_batch_size`` sizes a batch from the memory estimate of
:mod:`qwenvl_cli.fit.memory`: the KV cache and activations one request needs, against the GPU
memory left after loading the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenvl_cli import settings
from qwenvl_cli.catalogue.dims import ModelDims
from qwenvl_cli.errors import UsageError
from qwenvl_cli.fit import memory

AUTO = "auto"
CPU_BATCH = 4  # on CPU larger batches gain little: the matrix products already use every core
MAX_AUTO_BATCH = 64  # past this, generate's per-step overhead is amortised; latency only grows
MEMORY_SHARE = 0.8  # of the free memory after loading: room for fragmentation and spikes
REMOTE_CONCURRENCY = 8  # requests in flight to a server when --batch-size is auto
CLUSTER_BATCH = 4  # requests an engine actor decodes together with --cluster when --batch-size is auto


def parse_batch_size(value: str | None) -> int | None:
    """'auto' (or nothing) -> None; '8' -> 8; UsageError otherwise."""
    if value is None or str(value).strip().lower() == AUTO:
        return None
    try:
        size = int(str(value).strip())
    except ValueError:
        raise UsageError(f"--batch-size {value!r} is not a number", "use a whole number like 8, or auto") from None
    if size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {size}", "use a whole number like 8, or auto")
    return size


def plan_batches(requests: Sequence[Any], batch_size: int) -> list[list[Any]]:
    """Group by sampling options (groups in order of first appearance), sort each group by
    ``size`` (the length proxy, then the input line), and cut it into batches."""
    groups: dict[tuple, list[Any]] = {}
    for request in requests:
        groups.setdefault(request.params.batch_key(), []).append(request)
    batches = []
    for group in groups.values():
        group = sorted(group, key=lambda r: (r.size, r.line))
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


# --- --batch-size auto ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """The chosen batch size and the one line that explains it."""

    size: int
    reason: str


def request_bytes(dims: ModelDims, text_tokens: int, max_new_tokens: int, images: int, frames: int,
                  max_pixels: int | None) -> tuple[int, int]:
    """(bytes, tokens) one more request adds to a batch: its KV cache for prompt + answer,
    its share of the prefill and vision activations, its logits (memory.compute's parts)."""
    shape = memory.Workload(max_pixels=max_pixels or settings.DEFAULT_MAX_PIXELS, images=images, frames=frames)
    prompt = text_tokens + memory.visual_tokens(dims, shape)
    context = prompt + max_new_tokens
    workload = memory.Workload(context_length=context, prompt_tokens=prompt, max_pixels=shape.max_pixels,
                               images=images, frames=frames)
    est = memory.compute(dims, "batch request", "pytorch", None, context, workload)
    return est.kv_cache + est.activations, context


def auto_batch_size(dims: ModelDims | None, free_bytes: int | None, on_gpu: bool, pending: int,
                    text_tokens: int, max_new_tokens: int, images: int = 1, frames: int = 0,
                    max_pixels: int | None = None) -> Sizing:
    """How many requests to decode at once.

    On GPU: as many as fit in ``MEMORY_SHARE`` of the memory left after loading, for the
    largest request of the file (``text_tokens`` plus its ``images`` and video ``frames``
    at ``max_pixels``, plus ``max_new_tokens``), at most MAX_AUTO_BATCH and never more
    than are pending. On CPU, or when the free memory is unknown: a modest CPU_BATCH.
    """
    cap = max(1, pending)
    if not on_gpu or dims is None or free_bytes is None:
        where = "on CPU" if not on_gpu else "with the free GPU memory unknown"
        size = min(CPU_BATCH, cap)
        return Sizing(size, f"--batch-size auto: {size} {where} (set --batch-size to change it)")
    per, tokens = request_bytes(dims, text_tokens, max_new_tokens, images, frames, max_pixels)
    fits = max(1, math.floor(free_bytes * MEMORY_SHARE / per))
    size = min(fits, MAX_AUTO_BATCH, cap)
    gib = 1 << 30
    return Sizing(size, f"--batch-size auto: {size} (~{per / gib:.2f} GiB per request of up to "
                        f"{tokens:,} tokens; {free_bytes / gib:.1f} GiB free after loading)")
