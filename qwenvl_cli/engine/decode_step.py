"""One decode step of Qwen2-VL's language model, run four ways, and the KV caches they use.

A :class:`Runner` holds the state of one generation (its KV cache, the next positions,
the padding mask) and turns the last sampled token of every row into the next logits:

- ``EagerRunner``: transformers' DynamicCache, eager kernels (what ``generate`` does, minus
  the per-step mask bookkeeping that reads values back to the host);
- ``StaticRunner``: a preallocated :class:`~transformers.StaticCache` sized to a bucket,
  eager kernels;
- ``GraphRunner``: the static step captured once per (batch, bucket) as a CUDA graph and
  replayed: one launch per token instead of ~800 kernel launches;
- ``CompiledRunner``: the static step through ``torch.compile(mode="reduce-overhead")``
  (inductor fuses the small element-wise kernels, then CUDA graphs).

Static caches live in a :class:`CachePool` keyed by (batch, bucket) so that compiled code
and captured graphs, which are tied to the cache tensors' addresses, are reused across
requests: a new prompt length picks a bucket (a power of two), never a new compilation.

Nothing in a step reads a device value on the host, so the caller can queue the next
step before it looks at the last token (see :mod:`qwenvl_cli.engine.fastpath`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

MIN_BUCKET = 256


def bucket(length: int, limit: int | None = None) -> int:
    """The cache length for ``length`` positions: the next power of two from 256 up;
    past ``limit`` (the context length + 1), the exact length rounded up to 256."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    if limit is not None and size > limit:
        size = max(length, -(-limit // MIN_BUCKET) * MIN_BUCKET)
    return size


def buckets_up_to(length: int) -> list[int]:
    """Every bucket from the smallest up to the one holding ``length`` (for warm-up)."""
    out, size = [], MIN_BUCKET
    while True:
        out.append(size)
        if size >= length:
            return out
        size *= 2


def static_mask(torch: Any, attn2d: Any, written: Any) -> Any:
    """The 4D boolean mask of a one-token query over a static cache.

    ``attn2d`` (B, L) is 1 where a row holds a real token (0 on its left padding);
    ``written`` is the number of positions already in the cache, which is also the
    position the new token goes to. Built on the device, with no host read.
    """
    length = attn2d.shape[-1]
    causal = torch.arange(length, device=attn2d.device) <= written
    return (attn2d.bool() & causal)[:, None, None, :]


class Runner:
    """One generation's decode state. ``prefill`` runs the prompt (vision tower included)
    and returns the last position's logits (B, V) in float32; ``step`` feeds one token per
    row and returns the next logits. Neither reads device values on the host."""

    kind = "eager"

    def __init__(self, model: Any, batch: int, length: int) -> None:
        self.model = model
        self.batch = batch
        self.length = length  # positions the cache holds (static) or will hold (dynamic)
        self.pos = None  # (4, B, 1) next positions: text row + three M-RoPE rows
        self.cache: Any = None

    def _forward(self, **kwargs: Any) -> Any:
        out = self.model(use_cache=True, logits_to_keep=1, return_dict=True, **kwargs)
        return out.logits[:, -1, :].float()

    def prefill(self, inputs: dict[str, Any], position_ids: Any) -> Any:
        self.pos = position_ids[..., -1:].clone() + 1
        return self._forward(past_key_values=self.cache, position_ids=position_ids, **inputs)

    def step(self, tokens: Any) -> Any:
        raise NotImplementedError

    def release(self) -> None:
        """Give the cache back (to the pool, or to the allocator)."""
        self.cache = None


class EagerRunner(Runner):
    """DynamicCache and eager kernels; the mask is a view of a preallocated buffer."""

    def __init__(self, model: Any, batch: int, length: int) -> None:
        super().__init__(model, batch, length)
        from transformers import DynamicCache

        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.mask = None
        self.seen = 0
        self.sdpa = model.config.get_text_config()._attn_implementation == "sdpa"

    def prefill(self, inputs: dict[str, Any], position_ids: Any) -> Any:
        import torch

        attn = inputs.get("attention_mask")
        self.seen = int(inputs["input_ids"].shape[-1])
        if attn is not None and not bool(attn.all()):  # left padding: keep a mask
            self.mask = torch.ones((self.batch, self.length), dtype=torch.bool, device=attn.device)
            self.mask[:, :self.seen] = attn.bool()
        return super().prefill(inputs, position_ids)

    def step(self, tokens: Any) -> Any:
        self.seen += 1
        mask = None if self.mask is None else self.mask[:, :self.seen]
        if mask is not None and self.sdpa:  # sdpa's own boolean mask: transformers would read it on the host
            mask = mask[:, None, None, :]
        logits = self._forward(input_ids=tokens[:, None], position_ids=self.pos,
                               attention_mask=mask, past_key_values=self.cache)
        self.pos.add_(1)
        return logits


class StaticRunner(Runner):
    """A pooled StaticCache of ``length`` positions and an eager step."""

    kind = "static"

    def __init__(self, model: Any, batch: int, length: int, slot: CacheSlot) -> None:
        super().__init__(model, batch, length)
        self.slot = slot
        self.cache = slot.cache
        self.attn2d = slot.attn2d
        self.tokens = slot.tokens
        self.pos = slot.pos  # the captured step reads these buffers: update them in place

    def prefill(self, inputs: dict[str, Any], position_ids: Any) -> Any:
        self.cache.reset()
        seen = int(inputs["input_ids"].shape[-1])
        attn = inputs.get("attention_mask")
        self.attn2d.fill_(1)
        if attn is not None:
            self.attn2d[:, :seen].copy_(attn)
        self.pos.copy_(position_ids[..., -1:] + 1)
        return self._forward(past_key_values=self.cache, position_ids=position_ids, **inputs)

    def _run(self) -> Any:
        return static_step(self.model, self.cache, self.tokens, self.pos, self.attn2d)

    def step(self, tokens: Any) -> Any:
        self.tokens.copy_(tokens)
        logits = self._run()
        self.pos.add_(1)
        return logits

    def release(self) -> None:
        self.slot.release()
        super().release()


def static_step(model: Any, cache: Any, tokens: Any, pos: Any, attn2d: Any) -> Any:
    """The decode step over a static cache: the function that is captured or compiled."""
    import torch

    written = cache.layers[0].cumulative_length
    mask = static_mask(torch, attn2d, written)
    out = model(input_ids=tokens[:, None], position_ids=pos, attention_mask=mask, past_key_values=cache,
                use_cache=True, logits_to_keep=1, return_dict=True)
    return out.logits[:, -1, :].float()


class GraphRunner(StaticRunner):
    """The static step captured as a CUDA graph once per pool slot, then replayed."""

    kind = "cuda-graph"

    def prefill(self, inputs: dict[str, Any], position_ids: Any) -> Any:
        self.slot.prepare(self.model, self.kind)  # the capture runs two steps: before the prompt
        return super().prefill(inputs, position_ids)

    def _run(self) -> Any:
        return self.slot.graph_replay(self.model)


class CompiledRunner(StaticRunner):
    """The static step through torch.compile (inductor + CUDA graphs), one per pool slot."""

    kind = "compile"

    def _run(self) -> Any:
        return self.slot.compiled_call(self.model, self.slot.pool_compiled())


class CacheSlot:
    """A static cache for (batch, length) and the buffers a captured step reads."""

    def __init__(self, model: Any, batch: int, length: int) -> None:
        import torch
        from transformers import StaticCache

        text = model.config.get_text_config(decoder=True)
        device = model.get_input_embeddings().weight.device
        self.batch, self.length, self.device = batch, length, device
        self.cache = StaticCache(config=text, max_cache_len=length)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.cache.early_initialization(batch_size=batch, num_heads=text.num_key_value_heads,
                                        head_dim=head_dim, dtype=model.dtype, device=device)
        self.attn2d = torch.ones((batch, length), dtype=torch.long, device=device)
        self.tokens = torch.zeros((batch,), dtype=torch.long, device=device)
        self.pos = torch.zeros((4, batch, 1), dtype=torch.long, device=device)
        self.busy = False
        self.pool_compiled: Any = lambda: None  # the pool's compiled step (set by CachePool)
        self.on_release: Any = lambda: None
        self.graph_pool = None  # shared by the pool's graphs (they never run at once)
        self.graph = None
        self.graph_logits = None
        self.marked = False  # dynamic dimensions marked for torch.compile
        self.failed: str | None = None  # why the captured / compiled step fell back to eager

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    def release(self) -> None:
        self.busy = False
        self.on_release()

    def prepare(self, model: Any, step: str) -> None:
        """Capture the CUDA graph now if the step needs one (it runs two steps on the cache),
        then leave the cache empty: call before putting any prompt in."""
        if step == "cuda-graph" and self.graph is None and self.failed is None:
            self.capture(model, self.graph_pool)
        self.cache.reset()

    # --- CUDA graph -------------------------------------------------------------------------

    def capture(self, model: Any, pool: Any = None) -> None:
        """Warm the step up on a side stream (cuBLAS handles, lazy inits), then capture it.
        A step that cannot be captured (a host sync crept in) falls back to eager kernels."""
        import torch

        try:
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    static_step(model, self.cache, self.tokens, self.pos, self.attn2d)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: requests preprocessed on the GPU by other threads meanwhile are not
            # part of the capture and are not refused by it
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.graph_logits = static_step(model, self.cache, self.tokens, self.pos, self.attn2d)
            self.graph = graph
        except RuntimeError as exc:
            self.graph, self.failed = None, f"CUDA graph capture failed ({_first_line(exc)}); eager step"
        self.cache.reset()

    def graph_replay(self, model: Any) -> Any:
        if self.graph is None and self.failed is None:  # warm-up: no prompt in the cache yet
            self.capture(model, self.graph_pool)
        if self.graph is None:
            return static_step(model, self.cache, self.tokens, self.pos, self.attn2d)
        self.graph.replay()
        return self.graph_logits

    # --- torch.compile ----------------------------------------------------------------------

    def compiled_call(self, model: Any, compiled: Any) -> Any:
        """The pool's compiled step on this slot (batch and length are dynamic dimensions:
        one compilation serves every bucket; CUDA graphs are recorded per shape)."""
        import torch

        if self.failed is not None or compiled is None:
            return static_step(model, self.cache, self.tokens, self.pos, self.attn2d)
        if not self.marked:
            self._mark_dynamic(torch)
        torch.compiler.cudagraph_mark_step_begin()
        try:
            return compiled(self.cache, self.tokens, self.pos, self.attn2d)
        except torch._dynamo.exc.TorchDynamoException as exc:  # raised while compiling: nothing ran
            self.failed = f"torch.compile failed ({type(exc).__name__}: {_first_line(exc)}); eager step"
            return static_step(model, self.cache, self.tokens, self.pos, self.attn2d)

    def _mark_dynamic(self, torch: Any) -> None:
        mark = torch._dynamo.maybe_mark_dynamic
        for layer in self.cache.layers:
            for buf in (layer.keys, layer.values):
                mark(buf, 0)
                mark(buf, 2)
        mark(self.tokens, 0)
        mark(self.pos, 1)
        mark(self.attn2d, 0)
        mark(self.attn2d, 1)
        self.marked = True


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def compile_step(torch: Any, model: Any, mode: str = "reduce-overhead", backend: str = "inductor",
                 dynamic: bool | None = None) -> Any:
    """``torch.compile`` of the static step, the cache an argument (one compiled graph for
    batch 1 and one for larger batches: dynamo specialises size 1; every length shares them)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    triton = getattr(getattr(torch, "_inductor", None), "config", None)
    if triton is not None and hasattr(triton.triton, "cudagraph_dynamic_shape_warn_limit"):
        triton.triton.cudagraph_dynamic_shape_warn_limit = None  # a graph per bucket is intended

    def step(cache, tokens, pos, attn2d):
        return static_step(model, cache, tokens, pos, attn2d)

    if backend != "inductor":
        return torch.compile(step, backend=backend, fullgraph=True, dynamic=dynamic)
    return torch.compile(step, mode=mode, fullgraph=True, dynamic=dynamic)


class CachePool:
    """Static caches by (batch, length), kept for reuse; the least recently used ones are
    dropped once the pool holds more than ``keep`` caches (their graphs go with them)."""

    def __init__(self, model: Any, keep: int = 4) -> None:
        self.model = model
        self.keep = keep
        self.slots: OrderedDict[tuple[int, int], CacheSlot] = OrderedDict()
        self.graph_pool: Any = None
        self.compiled: Any = None
        self.lock = threading.Lock()

    def compiled_step(self) -> Any:
        """The pool's one torch.compile'd step (compiled lazily at its first call)."""
        if self.compiled is None:
            import torch

            self.compiled = compile_step(torch, self.model)
        return self.compiled

    def acquire(self, batch: int, length: int) -> CacheSlot:
        with self.lock:
            key = (batch, length)
            slot = self.slots.get(key)
            if slot is not None and not slot.busy:
                self.slots.move_to_end(key)
            else:
                slot = CacheSlot(self.model, batch, length)
                slot.graph_pool = self._graph_pool()
                slot.pool_compiled = self.compiled_step
                slot.on_release = self.released
                self.slots[key] = slot  # a busy slot of the same key is replaced (rare)
                self._evict()
            slot.busy = True
            return slot

    def _graph_pool(self) -> Any:
        if self.graph_pool is None:
            import torch

            if torch.cuda.is_available():
                self.graph_pool = torch.cuda.graph_pool_handle()
        return self.graph_pool

    def drop(self, slot: CacheSlot) -> None:
        """Forget a slot (its cache and graph are freed when no runner holds them)."""
        with self.lock:
            for key, held in list(self.slots.items()):
                if held is slot:
                    del self.slots[key]

    def _evict(self) -> None:
        """Batched caches are large and serve one session: keep the latest idle one only.
        Then the least recently used idle caches go until at most ``keep`` remain."""
        idle_batched = [k for k, s in self.slots.items() if k[0] > 1 and not s.busy]
        for key in idle_batched[:-1]:
            del self.slots[key]
        for key in [k for k, s in self.slots.items() if not s.busy]:
            if len(self.slots) <= self.keep:
                break
            del self.slots[key]

    def released(self) -> None:
        with self.lock:
            self._evict()

    def describe(self) -> list[dict[str, Any]]:
        return [{"batch": b, "length": n, "bytes": s.nbytes, "graph": s.graph is not None,
                 "fallback": s.failed} for (b, n), s in self.slots.items()]
