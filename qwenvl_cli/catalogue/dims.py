"""The architecture figures of one model size, as the spec YAML's `sizes:` states them, and
the parameter counts derived from them (Qwen2-VL layout: a Qwen2 decoder plus a ViT vision tower).

The memory estimate (:mod:`qwenvl_cli.fit.memory`) is computed from these figures. The catalogue
also states each spec's total parameter count; validation checks that the two agree, so
a typo in either is caught when the catalogue is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

QUANT_GROUP_SIZE = 128  # every published Qwen2-VL GPTQ / AWQ checkpoint uses groups of 128


@dataclass(frozen=True)
class VisionDims:
    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int

    @property
    def patch_values(self) -> int:
        """Numbers in one flattened patch (channels x temporal x patch x patch)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def pixels_per_token(self) -> int:
        """Pixels covered by one visual token (28 x 28 for Qwen2-VL)."""
        return (self.patch_size * self.spatial_merge_size) ** 2

    def parameters(self, text_hidden: int) -> int:
        d, r = self.embed_dim, self.mlp_ratio
        block = (4 + 2 * r) * d * d + (9 + r) * d  # qkv, proj, fc1, fc2 (+ biases), 2 LayerNorms
        patch_embed = self.patch_values * d  # Conv3d without bias
        merged = d * self.spatial_merge_size ** 2
        merger = 2 * d + merged * merged + merged + merged * text_hidden + text_hidden
        return self.depth * block + patch_embed + merger


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    vision: VisionDims

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of the linear layers of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def layer_linear_parameters(self) -> int:
        return sum(a * b for a, b in self.layer_linears())

    @property
    def layer_other_parameters(self) -> int:
        """q/k/v biases and the two RMSNorms of one decoder layer (kept 16-bit when quantized)."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return q + 2 * kv + 2 * self.hidden_size

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_parameters(self) -> int:
        """0 when the output layer shares the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def vision_parameters(self) -> int:
        return self.vision.parameters(self.hidden_size)

    @property
    def language_parameters(self) -> int:
        """The decoder layers and the final norm (no embeddings, no lm_head)."""
        per_layer = self.layer_linear_parameters + self.layer_other_parameters
        return self.num_hidden_layers * per_layer + self.hidden_size

    @property
    def total_parameters(self) -> int:
        return (self.language_parameters + self.embedding_parameters + self.lm_head_parameters
                + self.vision_parameters)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes


def from_config(config: dict) -> ModelDims | None:
    """The figures of a loaded checkpoint from its config.json (transformers' Qwen2-VL keys,
    flat or under text_config); None when a key is missing."""
    text = {**config, **(config.get("text_config") or {})}
    vision = config.get("vision_config") or {}
    try:
        heads = text["num_attention_heads"]
        return ModelDims(
            hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads", heads),
            head_dim=text.get("head_dim") or text["hidden_size"] // heads, vocab_size=text["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision=VisionDims(depth=vision["depth"], embed_dim=vision["embed_dim"], num_heads=vision["num_heads"],
                              mlp_ratio=vision.get("mlp_ratio", 4), patch_size=vision.get("patch_size", 14),
                              temporal_patch_size=vision.get("temporal_patch_size", 2),
                              spatial_merge_size=vision.get("spatial_merge_size", 2),
                              in_channels=vision.get("in_chans", vision.get("in_channels", 3))))
    except (KeyError, TypeError, ZeroDivisionError):
        return None


# --- validation (called by catalogue.parse, which supplies the error constructor) -----

Fail = Callable[[str, str], Exception]
_VISION_KEYS = [f.name for f in fields(VisionDims)]
_TEXT_KEYS = [f.name for f in fields(ModelDims) if f.name != "vision"]


def parse(raw: object, where: str, fail: Fail) -> ModelDims:
    """Build a ModelDims from one YAML mapping; every key is required and checked."""
    values = _check_mapping(raw, _TEXT_KEYS + ["vision"], where, fail,
                            bools={"tie_word_embeddings"})
    vision = VisionDims(**_check_mapping(values.pop("vision"), _VISION_KEYS, f"{where}: vision", fail))
    arch = ModelDims(vision=vision, **values)
    if arch.num_attention_heads % arch.num_key_value_heads:
        raise fail(f"{where}: num_key_value_heads",
                   f"must divide num_attention_heads ({arch.num_attention_heads})")
    return arch


def _check_mapping(raw: object, keys: list[str], where: str, fail: Fail,
                   bools: set[str] = frozenset()) -> dict:
    if not isinstance(raw, dict):
        raise fail(where, f"must be a mapping with {', '.join(keys)}")
    for key in raw:
        if key not in keys:
            from qwenvl_cli.errors import did_you_mean

            raise fail(f"{where}: {key}", "unknown key" + did_you_mean(str(key), keys)
                       + "; allowed: " + ", ".join(keys))
    for key in keys:
        if key not in raw:
            raise fail(f"{where}: {key}", "missing required key")
        value = raw[key]
        if key == "vision":
            continue
        if key in bools:
            if not isinstance(value, bool):
                raise fail(f"{where}: {key}", f"must be true or false, not {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise fail(f"{where}: {key}", f"must be a positive integer, not {value!r}")
    return dict(raw)
