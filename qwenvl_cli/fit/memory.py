"""How much GPU memory a resolved spec needs: weights, KV cache, activations, overhead.

Pure arithmetic on the architecture figures of the catalogue (``sizes:`` in the spec
YAML); nothing here imports torch or looks at a GPU. docs/memory.md explains each part
and compares the result with the published measurements.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from qwenvl_cli import settings
from qwenvl_cli.catalogue.dims import QUANT_GROUP_SIZE, ModelDims
from qwenvl_cli.catalogue.spec import NO_QUANTIZATION, ResolvedSpec, size_display
from qwenvl_cli.errors import NoEstimate

GiB = 1 << 30
MiB = 1 << 20
DTYPE_BYTES = 2  # bf16 (pytorch) or fp16 (AWQ, GPTQ): weights kept 16-bit, KV, activations

# Stated overhead, per GPU: the CUDA context with its loaded kernels and the cuBLAS
# workspace, plus what the caching allocator holds beyond live tensors (rounding of
# blocks, fragmentation as the KV cache grows), taken as a share of the rest.
CUDA_CONTEXT_BYTES = 512 * MiB
ALLOCATOR_SLACK = 0.02

# Activations. One prompt is prefilled at once. The vision tower runs first and its
# working set is freed before the decoder prefills, so the peak is the larger of the two,
# plus the float32 pixel tensor that stays alive through generation.
TEXT_TOKENS = 512  # text besides the visual tokens, when the prompt length is not given
VISION_BYTES_PER_DIM = 28  # per patch, x embed_dim: a vision block's peak (rotary in fp32)
PIXEL_BYTES = 4  # the float32 pixel tensor, per value (its 16-bit copy is in the tower's peak)
# Video (qwen-vl-utils): at most 768 tokens per frame pair, ~24.5k visual tokens a video.
VIDEO_MAX_TOKENS_PER_FRAME = 768
VIDEO_MAX_TOKENS = 24576


@dataclass(frozen=True)
class Workload:
    """What the model must be able to hold besides its weights."""

    context_length: int | None = None  # tokens of KV cache; None: the family's context length
    prompt_tokens: int | None = None  # one prompt prefilled at once; None: visual + TEXT_TOKENS
    max_pixels: int = settings.DEFAULT_MAX_PIXELS  # per image (and per video frame)
    images: int = 1  # images in that prompt, each at max_pixels
    frames: int = 0  # video frames in that prompt (0: no video)
    # vLLM (--model-engine vllm): tensor parallel, every GPU holds 1/N of every layer, instead
    # of transformers' device map, where each GPU holds whole layers.
    tensor_parallel: bool = False


def workload(context_length: int | None = None, max_pixels: int | None = None, **more: int) -> Workload:
    """A Workload from command-line values, where None means the default."""
    return Workload(context_length=context_length,
                    max_pixels=max_pixels or settings.DEFAULT_MAX_PIXELS, **more)


@dataclass(frozen=True)
class Estimate:
    """A breakdown in bytes; ``per_gpu(n)`` splits it over n GPUs (decoder layers spread)."""

    label: str
    dtype: str
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    context_length: int
    prompt_tokens: int
    visual_tokens: int
    # how it splits: every GPU holds some decoder layers (weights + their KV cache), its
    # CUDA context and the prefill activations; the first also the vision tower (weights,
    # pixels, the part of its peak above the prefill's) and the embeddings, the last the
    # lm_head.
    layers: int
    layer_bytes: int
    first_bytes: int
    last_bytes: int
    transient_bytes: int
    heads: int = 1  # attention heads: a tensor-parallel size must divide them
    kv_heads: int = 1  # ...and divide the KV heads or be a multiple of them (vLLM replicates)
    tensor_parallel: bool = False  # how per_gpu splits (see Workload.tensor_parallel)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    def splits_into(self, n: int) -> bool:
        """Whether the model can be spread over ``n`` GPUs (tensor parallel: n divides the heads)."""
        if not self.tensor_parallel:
            return 1 <= n <= self.layers
        return n >= 1 and self.heads % n == 0 and (self.kv_heads % n == 0 or n % self.kv_heads == 0)

    def per_gpu(self, n: int) -> tuple[int, ...]:
        """Bytes on each of ``n`` GPUs; for n=1 this is ``(total,)``.

        Layers spread (transformers' device map): each GPU holds whole decoder layers, the first
        also the vision tower. Tensor parallel (vLLM): each GPU holds 1/n of the weights and KV
        cache, and the whole of the prefill's activations and its CUDA context."""
        if self.tensor_parallel:
            n = max(1, n)
            split = -(-(self.layers * self.layer_bytes + self.first_bytes + self.last_bytes) // n)
            return (_with_overhead(split + self.transient_bytes),) * n
        n = max(1, min(n, self.layers))
        base, extra = divmod(self.layers, n)
        shares = []
        for k in range(n):
            layers = base + (1 if k >= n - extra else 0)  # the first GPU also holds the vision tower
            live = layers * self.layer_bytes + self.transient_bytes
            live += (self.first_bytes if k == 0 else 0) + (self.last_bytes if k == n - 1 else 0)
            shares.append(_with_overhead(live))
        return tuple(shares)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.label, "dtype": self.dtype, "weights_bytes": self.weights,
                "kv_cache_bytes": self.kv_cache, "activations_bytes": self.activations,
                "overhead_bytes": self.overhead, "total_bytes": self.total,
                "context_length": self.context_length, "prompt_tokens": self.prompt_tokens,
                "visual_tokens": self.visual_tokens}

    def describe(self) -> str:
        """'~17.9 GiB (weights 15.4 + KV cache 1.8 at 32,768 tokens + activations 0.3 + overhead 0.9)'"""
        return (f"~{self.total / GiB:.1f} GiB (weights {self.weights / GiB:.1f} + KV cache "
                f"{self.kv_cache / GiB:.1f} at {self.context_length:,} tokens + activations "
                f"{self.activations / GiB:.1f} + overhead {self.overhead / GiB:.1f})")


def _with_overhead(live: int) -> int:
    return live + math.ceil(live * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES


# --- the estimate ---------------------------------------------------------------------


def quant_bits(quantization: str) -> int | None:
    """'none' -> None (16-bit); 'Int4', '4-bit', 'int8' -> 4, 8. ValueError otherwise."""
    text = quantization.strip().lower()
    if text == NO_QUANTIZATION:
        return None
    match = re.fullmatch(r"(?:int|w)?(\d+)(?:-?bits?)?", text)
    if not match or not 1 <= int(match.group(1)) <= 16:
        raise ValueError(quantization)
    return int(match.group(1))


def estimate(spec: ResolvedSpec, workload: Workload = Workload()) -> Estimate:
    """The memory ``spec`` needs for ``workload``; raises NoEstimate without figures."""
    dims = spec.dims
    if dims is None:
        raise NoEstimate(f"{spec.label()}: the spec file gives no architecture figures",
                         f"add a `sizes:` entry for {size_display(spec.size_in_billions)} to "
                         f"{spec.family.source_file} (see docs/memory.md)")
    try:
        bits = quant_bits(spec.quantization)
    except ValueError:
        raise NoEstimate(f"{spec.label()}: cannot tell the bits of quantization {spec.quantization!r}",
                         "name quantizations like Int4 or Int8 so the size can be estimated") from None
    context = workload.context_length or spec.family.context_length
    return compute(dims, spec.label(), spec.model_format, bits, context, workload)


def compute(dims: ModelDims, label: str, model_format: str, bits: int | None,
            context_length: int, workload: Workload) -> Estimate:
    """The arithmetic behind :func:`estimate`, on bare figures."""
    visual = visual_tokens(dims, workload)
    prompt = visual + TEXT_TOKENS if workload.prompt_tokens is None else max(workload.prompt_tokens, visual)
    prompt = max(1, min(prompt, context_length))
    layer_weights = _layer_weight_bytes(dims, bits, model_format)
    kv_layer = dims.kv_bytes_per_token(DTYPE_BYTES) // dims.num_hidden_layers * context_length
    embed = dims.embedding_parameters * DTYPE_BYTES
    vision_weights = dims.vision_parameters * DTYPE_BYTES
    head = (dims.lm_head_parameters + dims.hidden_size) * DTYPE_BYTES  # lm_head + final norm
    pixels, vision_peak, prefill, logits = _activation_parts(dims, prompt, visual)

    weights = dims.num_hidden_layers * layer_weights + embed + vision_weights + head
    kv = dims.num_hidden_layers * kv_layer
    activations = pixels + max(vision_peak, prefill) + logits
    live = weights + kv + activations
    return Estimate(
        label=label, dtype="bfloat16" if bits is None and model_format == "pytorch" else "float16",
        weights=weights, kv_cache=kv, activations=activations,
        overhead=_with_overhead(live) - live, context_length=context_length,
        prompt_tokens=prompt, visual_tokens=visual, layers=dims.num_hidden_layers,
        layer_bytes=layer_weights + kv_layer, last_bytes=head + logits, transient_bytes=prefill,
        first_bytes=embed + vision_weights + pixels + max(vision_peak - prefill, 0),
        heads=dims.num_attention_heads, kv_heads=dims.num_key_value_heads, tensor_parallel=workload.tensor_parallel)


def _activation_parts(dims: ModelDims, prompt: int, visual: int) -> tuple[int, int, int, int]:
    """(pixel tensor, vision-tower peak, decoder prefill peak, last-position logits) in bytes."""
    vis = dims.vision
    patches = visual * vis.spatial_merge_size ** 2
    pixels = patches * vis.patch_values * PIXEL_BYTES
    vision_peak = patches * (VISION_BYTES_PER_DIM * vis.embed_dim + vis.patch_values * DTYPE_BYTES)
    logits = dims.vocab_size * (DTYPE_BYTES + 4 + 4)  # last position only: 16-bit, fp32, probs
    per_token = 8 * dims.intermediate_size + 8 * dims.hidden_size + 4 * dims.head_dim * 2
    prefill = prompt * per_token  # gate, up, act, product of the MLP; residual, norm, rotary
    return pixels, vision_peak, prefill, logits


def prompt_bytes(dims: ModelDims, prompt_tokens: int, visual_tokens: int, new_tokens: int) -> int:
    """Memory one request needs on top of the loaded weights: its activations (the larger of
    the vision tower's and the prefill's peak, the pixels, the logits) and its KV cache."""
    pixels, vision_peak, prefill, logits = _activation_parts(dims, prompt_tokens, visual_tokens)
    kv = dims.kv_bytes_per_token(DTYPE_BYTES) * (prompt_tokens + new_tokens)
    return pixels + max(vision_peak, prefill) + logits + kv


def _layer_weight_bytes(dims: ModelDims, bits: int | None, model_format: str) -> int:
    """One decoder layer. Quantized: packed weights, fp16 scales and packed zero points per
    group of 128 inputs (GPTQ adds an int32 group index per input); the rest stays 16-bit."""
    other = dims.layer_other_parameters * DTYPE_BYTES
    if bits is None:
        return dims.layer_linear_parameters * DTYPE_BYTES + other
    total = 0
    for fan_in, fan_out in dims.layer_linears():
        groups = math.ceil(fan_in / QUANT_GROUP_SIZE)
        total += math.ceil(fan_in * fan_out * bits / 8)  # packed weights
        total += groups * fan_out * DTYPE_BYTES  # scales
        total += math.ceil(groups * fan_out * bits / 8)  # packed zero points
        if model_format.lower() == "gptq":
            total += fan_in * 4  # g_idx
    return total + other


def visual_tokens(dims: ModelDims, workload: Workload) -> int:
    """Visual tokens of ``images`` images at ``max_pixels`` plus a video of ``frames`` frames."""
    per_token = dims.vision.pixels_per_token
    tokens = workload.images * (workload.max_pixels // per_token)
    if workload.frames > 0:
        pairs = math.ceil(workload.frames / dims.vision.temporal_patch_size)
        per_pair = min(workload.max_pixels // per_token, VIDEO_MAX_TOKENS_PER_FRAME)
        tokens += min(pairs * per_pair, VIDEO_MAX_TOKENS)
    return tokens
