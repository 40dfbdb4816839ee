"""``qvl_sdpa``: transformers' sdpa attention, with grouped-query decoding that never copies K/V.

Qwen2-VL's language model has 7 query heads per key/value head (12/2 for 2B, 28/4 for 7B).
For a one-token query, transformers' sdpa path folds the query heads onto their shared
key/value head ("pack_gqa": a reshape) — but only when it is not being compiled; under
torch.compile with a mask it calls ``repeat_kv``, which materialises every key and value of
the cache 7 times per layer and step: for 7B with a 2,048-position cache bucket about 1.7 GB
of extra memory traffic per token (12% over the weights), twice that at 4,096.

``qvl_sdpa`` does the fold in both cases and otherwise defers to transformers' sdpa (prefill,
masks, kernels), so the eager and the compiled step run the same attention. It is registered
with transformers' AttentionInterface (and the sdpa mask function) on first use, and the
static decoders put the language model on it; the vision tower keeps its own attention.
"""

from __future__ import annotations

from typing import Any

NAME = "qvl_sdpa"


def qvl_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
             scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if q_len != 1 or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # (B, H, 1, D) -> (B, H_kv, groups, D): query head h uses key/value head h // groups
    folded = query.reshape(batch, heads // groups, groups, dim)
    if attention_mask is not None and attention_mask.shape[1] != 1:  # a per-head mask: fold it too
        attention_mask = attention_mask.reshape(attention_mask.shape[0], heads // groups, groups, -1)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``qvl_sdpa`` known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, qvl_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
