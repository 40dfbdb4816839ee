"""Token selection on the device, with transformers' own logits processors.

:meth:`Sampler.build` reads ``generate``'s keyword arguments the way ``generate`` does
(the checkpoint's generation_config, then the call's overrides) and builds the same
LogitsProcessorList, so that qvl's loop picks the same tokens: argmax for greedy decoding,
``torch.multinomial`` over the processed distribution when sampling (the same random
stream, so a seed gives the same answer). None of it reads device values on the host.

One shortcut: with ``top_k == 1`` (Qwen2-VL's published generation_config samples with
top_k 1, top_p 0.001, temperature 0.01) sampling can only return the most likely token,
so the warpers and the draw are skipped and the argmax is taken (identical unless two
logits are exactly equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GENERATION_ONLY = ("max_new_tokens", "pad_token_id", "eos_token_id", "do_sample", "temperature", "top_p",
                   "top_k", "repetition_penalty", "min_new_tokens", "max_length", "min_length")


@dataclass
class Sampler:
    processors: Any  # LogitsProcessorList applied before the choice
    do_sample: bool
    max_new_tokens: int
    pad_id: int
    pad: Any  # pad id as a device tensor
    eos: Any  # eos ids as a device tensor, or None
    eos_set: frozenset[int]

    @classmethod
    def build(cls, model: Any, input_ids: Any, kwargs: dict[str, Any]) -> tuple[Sampler, dict[str, Any]]:
        """(sampler, the remaining model inputs) from ``generate``-style kwargs."""
        import torch

        config, model_inputs = model._prepare_generation_config(None, **kwargs)
        device = input_ids.device
        model._prepare_special_tokens(config, True, device=device)
        prompt = int(input_ids.shape[-1])
        max_new = config.max_new_tokens
        if max_new is None:
            max_new = max(0, int(config.max_length) - prompt)
        greedy = not config.do_sample or config.top_k == 1
        if greedy and config.do_sample:  # top_k 1: leave the warpers (and the draw) out
            config.do_sample = False
        processors = model._get_logits_processor(config, input_ids_seq_length=prompt, device=device)
        eos = config._eos_token_tensor
        pad = config._pad_token_tensor
        if pad is None:
            pad = eos[0] if eos is not None else torch.tensor(0, device=device)
        eos_set = frozenset(int(e) for e in eos.reshape(-1).tolist()) if eos is not None else frozenset()
        sampler = cls(processors, bool(config.do_sample), int(max_new), int(pad), pad.to(device),
                      eos.to(device) if eos is not None else None, eos_set)
        return sampler, model_inputs

    def select(self, ids: Any, logits: Any) -> Any:
        """The next token of every row (B,) from the last logits (B, V) in float32."""
        import torch

        scores = self.processors(ids, logits) if len(self.processors) else logits
        if self.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            return torch.multinomial(probs, num_samples=1).squeeze(1)
        return torch.argmax(scores, dim=-1)
