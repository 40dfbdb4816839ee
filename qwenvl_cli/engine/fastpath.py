"""qvl's decode loop: the engine's fast path next to plain ``model.generate``.

The engine calls ``decoder.generate(**inputs, **kwargs)`` with the same arguments it would
give ``model.generate`` (a streamer and stopping criteria included). :func:`make_decoder`
returns either :class:`GenerateDecoder` (transformers' own loop) or :class:`FastDecoder`:

- sampling on the device with transformers' own logits processors, so greedy output is
  token-for-token that of ``generate``, and seeded sampling draws the same tokens;
- no host-device synchronisation per token: the step for token i+1 is queued before the
  host waits for token i, which is copied into pinned memory asynchronously (the host is
  never more than one step behind and the GPU never idles waiting for Python);
- optionally a static KV cache sized to a power-of-two bucket, and the decode step
  replayed as a CUDA graph or compiled with ``torch.compile`` (see :mod:`qwenvl_cli.engine.decode_step`).

:func:`resolve` turns the engine options into a :class:`DecodeConfig` (what ``auto`` means
on this machine); it is pure and tested without torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qwenvl_cli.engine.options import COMPILE_MODES, DECODE_LOOPS, SWITCHES, choice
from qwenvl_cli.errors import UsageError

TEXT_ATTN = "qvl_sdpa"  # qwenvl_cli.engine.attention.NAME (not imported here: it is light, but keep it lazy)
# Warm-up prepares every cache bucket up to this many positions (prompt + answer).
DEFAULT_WARMUP_LENGTH = 4096


@dataclass(frozen=True)
class DecodeConfig:
    """What the engine does for each token, after ``auto`` was decided."""

    loop: str = "generate"  # "qvl" or "generate"
    step: str = "eager"  # "eager" (dynamic cache), "static", "cuda-graph", "compile"
    gpu_preprocess: bool = False
    text_attn: str | None = None  # attention for the language model when it must differ

    @property
    def static_cache(self) -> bool:
        return self.step != "eager"

    def describe(self) -> str:
        if self.loop == "generate":
            return "transformers generate"
        return f"qvl loop, {self.step} step" + (", GPU preprocessing" if self.gpu_preprocess else "")


def resolve(options: Any, on_gpu: bool, single_device: bool = True, attn: str = "sdpa") -> DecodeConfig:
    """Decide the decode path from EngineOptions-like ``options`` and the device plan.

    ``auto`` means: qvl's loop (on CUDA it avoids per-token syncs; on a CPU it runs on the
    calling thread, without the worker thread transformers' streaming needs),
    a static cache with CUDA graphs on one GPU, torch.compile when the engine is warmed up
    at load (``warmup``: a server pays the compile once, a one-shot chat would not earn it
    back), GPU image preprocessing on CUDA. Quantized checkpoints (their kernels refuse
    torch.compile) and models split over several GPUs keep the eager step.
    """
    loop = choice("--decode-loop", getattr(options, "decode_loop", "auto"), DECODE_LOOPS)
    compile_ = choice("--compile", getattr(options, "compile", "auto"), COMPILE_MODES)
    static = choice("--static-cache", getattr(options, "static_cache", "auto"), SWITCHES)
    gpu_pre = choice("--gpu-preprocess", getattr(options, "gpu_preprocess", "auto"), SWITCHES)
    quantized = getattr(options, "model_format", "pytorch") in ("awq", "gptq")
    if loop == "auto":  # qvl's loop everywhere: on a CPU it runs on the calling thread (no worker)
        loop = "qvl"
    if loop == "generate":
        if compile_ in ("on", "graphs") or static == "on":
            raise UsageError("--compile and --static-cache need qvl's decode loop",
                             "drop --decode-loop generate, or the other flag")
        return DecodeConfig("generate", "eager", on_gpu and gpu_pre != "off")
    if compile_ == "graphs" and not on_gpu:
        raise UsageError("--compile graphs needs a CUDA GPU", "use --compile on (inductor) or off on CPU")
    if compile_ == "auto":
        if not on_gpu or quantized or not single_device:
            compile_ = "off"
        else:
            compile_ = "on" if getattr(options, "warmup", False) else "graphs"
    if compile_ != "off" and not single_device:
        raise UsageError(f"--compile {compile_} needs the model on one device",
                         "use --compile off with --n-gpu above 1")
    if compile_ != "off" and static == "off":
        raise UsageError(f"--compile {compile_} needs the static KV cache", "drop --static-cache off")
    if compile_ == "on":
        step = "compile"
    elif compile_ == "graphs":
        step = "cuda-graph"
    elif static == "on":
        step = "static"
    else:
        step = "eager"
    # The static step's mask is sdpa's boolean one (and flash-attention-2 would read the padding
    # on the host): the language model runs on qvl_sdpa (sdpa without the K/V copies of grouped
    # heads under torch.compile, see qwenvl_cli.engine.attention), the vision tower keeps ``attn``.
    text_attn = TEXT_ATTN if step != "eager" else None
    return DecodeConfig("qvl", step, on_gpu and gpu_pre != "off", text_attn)


def attn_implementation(plan_attn: str, config: DecodeConfig) -> Any:
    """The ``attn_implementation`` for from_pretrained: one name, or per sub-model."""
    if config.text_attn is None or config.text_attn == plan_attn:
        return plan_attn
    from qwenvl_cli.engine import attention

    attention.register()
    return {"": plan_attn, "text_config": config.text_attn, "vision_config": plan_attn}


def make_decoder(model: Any, config: DecodeConfig, context_length: int | None = None) -> Any:
    if config.loop == "generate":
        return GenerateDecoder(model, config)
    return FastDecoder(model, config, context_length)


class GenerateDecoder:
    """transformers' ``generate``, unchanged."""

    def __init__(self, model: Any, config: DecodeConfig) -> None:
        self.model = model
        self.config = config

    def generate(self, **kwargs: Any) -> Any:
        return self.model.generate(**kwargs)

    def warmup(self, *args: Any, **kwargs: Any) -> float:
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {"decode": self.config.describe()}


@dataclass
class _Readback:
    """Tokens on their way to the host: pinned buffers and an event per step (two slots)."""

    slots: list[tuple[Any, Any]] = field(default_factory=list)
    turn: int = 0

    @property
    def asynchronous(self) -> bool:
        return bool(self.slots) and self.slots[0][1] is not None

    @classmethod
    def make(cls, torch: Any, batch: int, device: Any) -> _Readback:
        pinned = getattr(device, "type", str(device)).startswith("cuda")
        make_event = (lambda: torch.cuda.Event()) if pinned else (lambda: None)
        return cls([(torch.zeros(batch, dtype=torch.long, pin_memory=pinned), make_event()) for _ in range(2)])

    def send(self, tokens: Any) -> tuple[Any, Any]:
        host, event = self.slots[self.turn]
        self.turn ^= 1
        host.copy_(tokens, non_blocking=event is not None)
        if event is not None:
            event.record()
        return host, event

    @staticmethod
    def receive(sent: tuple[Any, Any]) -> list[int]:
        host, event = sent
        if event is not None:
            event.synchronize()
        return host.tolist()


class FastDecoder:
    """``generate``-compatible greedy and sampled decoding without per-token host syncs."""

    def __init__(self, model: Any, config: DecodeConfig, context_length: int | None = None) -> None:
        from qwenvl_cli.engine.decode_step import CachePool

        self.model = model
        self.config = config
        self.context_length = context_length
        self.pool = CachePool(model) if config.static_cache else None
        if self.pool is not None and model.config.get_text_config()._attn_implementation != TEXT_ATTN:
            from qwenvl_cli.engine import attention

            attention.register()
            model.set_attn_implementation({"text_config": TEXT_ATTN})  # the static mask is sdpa's
        self.last: dict[str, Any] = {}

    # --- the pieces -------------------------------------------------------------------------

    def runner(self, batch: int, need: int) -> Any:
        from qwenvl_cli.engine import decode_step as ds

        if self.pool is None:
            return ds.EagerRunner(self.model, batch, need)
        limit = None if self.context_length is None else self.context_length + 1
        return self.runner_for(self.pool.acquire(batch, ds.bucket(need, limit)))

    def runner_for(self, slot: Any) -> Any:
        """The runner of this decoder's step kind over a pooled cache slot."""
        from qwenvl_cli.engine import decode_step as ds

        cls = {"static": ds.StaticRunner, "cuda-graph": ds.GraphRunner, "compile": ds.CompiledRunner}[self.config.step]
        return cls(self.model, slot.batch, slot.length, slot)

    def sampler(self, input_ids: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from qwenvl_cli.engine.sampling import Sampler

        return Sampler.build(self.model, input_ids, kwargs)

    # --- generate -------------------------------------------------------------------------

    def iterate(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Iterator[list[int]]:
        """Decode on the calling thread, yielding each step's new token per row (the pad token
        for rows that already ended); stops when every row has ended or the budget is spent.

        Closing the generator stops decoding and gives the cache back, so a consumer that
        stops reading (a stop string, Ctrl-C, a client gone) costs nothing more. Each step
        runs under inference mode; nothing of it leaks into the caller between steps.
        """
        import torch

        sampler, model_inputs = self.sampler(input_ids, kwargs)
        batch, prompt = input_ids.shape
        max_new = sampler.max_new_tokens
        inputs = dict(model_inputs, input_ids=input_ids)
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        runner = self.runner(batch, prompt + max_new + 1)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                position_ids = self.model._prepare_position_ids_for_generation(input_ids, dict(inputs))
                logits = runner.prefill(inputs, position_ids)
                ids = torch.full((batch, prompt + max_new), sampler.pad_id, dtype=torch.long,
                                 device=input_ids.device)
                ids[:, :prompt] = input_ids
            yield from self._steps(runner, sampler, ids, prompt, logits)
        finally:
            runner.release()
            self.last = {"runner": runner.kind, "cache_length": runner.length, "batch": batch,
                         "seconds": time.perf_counter() - started}

    def _steps(self, runner: Any, sampler: Any, ids: Any, prompt: int, logits: Any) -> Iterator[list[int]]:
        import torch

        readback = _Readback.make(torch, ids.shape[0], ids.device)
        ahead = readback.asynchronous  # on a GPU, queue step i+1 before waiting for token i
        unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        ended = [False] * ids.shape[0]  # on the host: rows that produced an end-of-sequence token
        max_new = ids.shape[1] - prompt
        for i in range(max_new):
            with torch.inference_mode():
                tokens = sampler.select(ids[:, :prompt + i], logits)
                if sampler.eos is not None:
                    tokens = torch.where(unfinished, tokens, sampler.pad)
                    unfinished &= ~torch.isin(tokens, sampler.eos)
                ids[:, prompt + i] = tokens
                sent = readback.send(tokens)
                more = i + 1 < max_new
                if ahead and more:
                    logits = runner.step(tokens)
                new = readback.receive(sent)
            yield new
            ended = [done or token in sampler.eos_set for done, token in zip(ended, new)]
            if all(ended):
                return
            if more and not ahead:  # on a CPU nothing runs ahead: deliver first, then step
                with torch.inference_mode():
                    logits = runner.step(tokens)

    def generate(self, input_ids: Any, attention_mask: Any = None, streamer: Any = None,
                 stopping_criteria: Any = None, **kwargs: Any) -> Any:
        """Decode like ``model.generate`` (streamer and stopping criteria included); returns the
        (B, prompt + new) token ids."""
        import torch

        if streamer is not None:
            streamer.put(input_ids.cpu())
        host_ids = input_ids.cpu()
        finished = [False] * input_ids.shape[0]
        steps = self.iterate(input_ids, attention_mask, **kwargs)
        try:
            for new in steps:
                if streamer is not None:
                    streamer.put(torch.tensor(new, dtype=torch.long))
                host_ids = torch.cat([host_ids, torch.tensor(new, dtype=torch.long)[:, None]], dim=1)
                if self._should_stop(new, finished, self._eos_ids(kwargs), stopping_criteria, host_ids):
                    break
        finally:
            steps.close()
            if streamer is not None:
                streamer.end()
        return host_ids.to(input_ids.device)

    def _eos_ids(self, kwargs: dict[str, Any]) -> frozenset[int]:
        eos = kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        return frozenset(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    @staticmethod
    def _should_stop(new: list[int], finished: list[bool], eos_ids: frozenset[int], criteria: Any,
                     host_ids: Any) -> bool:
        for row, token in enumerate(new):
            if token in eos_ids:
                finished[row] = True
        if criteria is not None and len(criteria):
            hit = criteria(host_ids, None)
            for row, value in enumerate(hit.tolist()):
                finished[row] = finished[row] or bool(value)
        return all(finished)

    # --- warm-up ----------------------------------------------------------------------------

    def warmup(self, batches: Iterable[int] = (1,), up_to: int = DEFAULT_WARMUP_LENGTH) -> float:
        """Compile or capture the decode step ahead of the requests; returns the seconds.

        Batch 1 is prepared for every cache bucket up to ``up_to`` positions, and those caches
        are kept (a captured graph belongs to its cache). With torch.compile, a larger batch
        compiles the graph every batch above 1 shares (once, at the smallest bucket); CUDA
        graphs for other shapes are captured when first used, in well under a second."""
        from qwenvl_cli.engine.decode_step import buckets_up_to

        if self.config.step not in ("cuda-graph", "compile"):
            return 0.0
        import torch

        started = time.perf_counter()
        limit = self.context_length + 1 if self.context_length else None
        lengths = [n for n in buckets_up_to(up_to) if limit is None or n <= limit]
        self.pool.keep = max(self.pool.keep, len(lengths) + 1)
        plan = [(b, lengths[0], False) for b in sorted(set(batches)) if b > 1 and self.config.step == "compile"]
        plan += [(1, n, True) for n in lengths if 1 in batches]
        with torch.inference_mode():
            for batch, length, keep in plan:
                runner = self.runner(batch, length)
                try:
                    runner.slot.prepare(self.model, self.config.step)
                    for _ in range(3):  # compile / record / replay
                        runner.step(runner.tokens.clone())
                finally:
                    runner.cache.reset()
                    runner.release()
                    if not keep:
                        self.pool.drop(runner.slot)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def describe(self) -> dict[str, Any]:
        return {"decode": self.config.describe(),
                "caches": self.pool.describe() if self.pool is not None else []}
