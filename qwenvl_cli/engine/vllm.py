"""The vLLM engine: Qwen2-VL served by vLLM in this process, behind the transformers engine's
interface (``prepare`` / ``job`` / ``stream`` / ``run_jobs`` / ``run_continuous``, the same
:class:`~qwenvl_cli.engine.engine.Prepared` and :class:`~qwenvl_cli.engine.engine.Job`
records, the same :class:`~qwenvl_cli.generation.Chunk` stream).

What qvl decides stays in front: qvl's media checks, pixel budget and video sampling
(``engine.vision.prepare_vision``) give decoded, already resized images and the sampled
frames (with their fps metadata), and the processor bounds (``min_pixels`` /
``max_pixels``) are set per request so that vLLM's processor keeps qvl's sizes. The chat
template is the checkpoint processor's, rendered here; vLLM expands the visual placeholders.
Detokenising, stop strings, end of sequence and the final record are qvl's own
:class:`~qwenvl_cli.generation.TokenStream`, so the answers read the same from both engines.

vLLM's scheduler does the batching: ``run_continuous`` adds each job to vLLM's engine as it
comes and steps it; the server's scheduler sees a decoder with a pool and hands jobs over
as they arrive. vLLM runs its model in child processes (EngineCore, workers); on CPU its KV
cache is bounded by ``VLLM_CPU_KVCACHE_SPACE`` (qvl's default: 2 GiB).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenvl_cli.engine.engine import Job, Prepared
from qwenvl_cli.engine.options import EngineOptions
from qwenvl_cli.engine.vllm_check import check_format, require_vllm, runs_on_cpu
from qwenvl_cli.errors import EngineError, MediaError, PromptTooLong, QvlError, UsageError, translate
from qwenvl_cli.generation import DEFAULT_MAX_TOKENS, Chunk, GenerationParams, TokenStream, sampling_note

CPU_KV_CACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE unless set: vLLM otherwise takes most of the RAM
MAX_IMAGES = 8  # limit_mm_per_prompt: vLLM sizes its encoder budget for this many per request
MAX_VIDEOS = 2
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
_ids = itertools.count()


@dataclass(frozen=True)
class VllmPlan:
    """Where vLLM runs the model (the transformers engine's devices.Plan, for what callers read)."""

    gpus: tuple[int, ...]
    dtype_name: str
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    ray_address: str | None = None
    input_device: str = "cpu"  # qvl prepares the media on the CPU; vLLM moves them

    def describe(self) -> str:
        if not self.gpus:
            return "cpu (vLLM)"
        parts = [f"tensor parallel {self.tensor_parallel}"] if self.tensor_parallel > 1 else []
        parts += [f"pipeline parallel {self.pipeline_parallel}"] if self.pipeline_parallel > 1 else []
        parts += [f"Ray at {self.ray_address}"] if self.ray_address else []
        where = "cuda:" + ",".join(map(str, self.gpus))
        return f"{where} (vLLM{', ' + ', '.join(parts) if parts else ''})"


@dataclass(frozen=True)
class _StepConfig:
    step: str = "vllm"
    gpu_preprocess: bool = False

    def describe(self) -> str:
        return "vLLM's scheduler and kernels"


@dataclass
class VllmDecoder:
    """What the server's scheduler and ``describe`` read off an engine's decoder: vLLM keeps a
    pool of running requests, so jobs are handed to it as they come (continuous batching)."""

    config: _StepConfig = field(default_factory=_StepConfig)
    pool: bool = True

    def describe(self) -> dict[str, Any]:
        return {"decode": "vllm"}


class VllmEngine:
    name = "vllm"

    def __init__(self, llm: Any, processor: Any, plan: VllmPlan, path: Path, context_length: int,
                 load_seconds: float, generation: dict[str, Any], notes: tuple[str, ...] = ()) -> None:
        from qwenvl_cli.catalogue.dims import from_config
        from qwenvl_cli.media.vision import VisionDefaults

        self.llm = llm
        self.processor = processor
        self.plan = plan
        self.path = path
        self.context_length = context_length
        self.load_seconds = load_seconds
        self.notes = notes
        self.decoder = VllmDecoder()
        self.warmup_seconds = 0.0
        self.generation = generation  # the checkpoint's generation_config.json
        self.vision_defaults = VisionDefaults()
        self.lock = threading.Lock()  # one thread steps vLLM's engine at a time
        tokenizer = processor.tokenizer
        eos = generation.get("eos_token_id", tokenizer.eos_token_id)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        try:
            self.dims = from_config(json.loads((path / "config.json").read_text()))
        except (OSError, ValueError):
            self.dims = None

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, options: EngineOptions = EngineOptions(),
             context_length: int | None = None) -> VllmEngine:
        path = Path(path)
        require_vllm()
        check_format(options, _quant_method(path))
        start = time.perf_counter()
        plan, kwargs = llm_kwargs(path, options, context_length)
        _quiet_vllm()
        try:
            from transformers import AutoProcessor
            from vllm import LLM

            llm = LLM(**kwargs)
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError) as exc:
            raise translate(exc) or EngineError(
                f"vLLM cannot load the model from {path}: {type(exc).__name__}: {_first_line(exc)}",
                "rerun with QVL_DEBUG=1 for vLLM's log; check the folder with `qvl verify`") from exc
        context = int(llm.llm_engine.model_config.max_model_len)
        generation = _read_json(path / "generation_config.json")
        return cls(llm, processor, plan, path, context, time.perf_counter() - start, generation)

    def warmup(self, batches: Sequence[int] = (1, 2), up_to: int | None = None) -> float:
        return 0.0  # vLLM profiles and captures its graphs while loading

    # --- inputs ---------------------------------------------------------------------------

    def prepare(self, messages: list[dict[str, Any]], policy: Any = None) -> Prepared:
        """The chat template, qvl's media (checked, sized, sampled) and the prompt's length:
        a vLLM prompt dict in ``Prepared.inputs``."""
        from qwenvl_cli.engine import vision
        from qwenvl_cli.media import sources as media

        start = time.perf_counter()
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        visual = vision.prepare_vision(messages, self.vision_defaults, policy or media.PERMISSIVE)
        images, videos = visual.images or [], visual.videos or []
        for kind, items, limit in (("image", images, MAX_IMAGES), ("video", videos, MAX_VIDEOS)):
            if len(items) > limit:
                raise MediaError(f"{len(items)} {kind}s in one request; the vLLM engine takes at most {limit}",
                                 f"send at most {limit} {kind}s per request")
        inputs = vllm_prompt(text, images, videos, visual.video_kwargs.get("fps") or [], visual.infos)
        text_ids = len(self.processor.tokenizer(text)["input_ids"])
        prompt_tokens = text_ids + sum(info.tokens - 1 for info in visual.infos)  # a pad each, expanded
        if prompt_tokens >= self.context_length:
            err = PromptTooLong(
                f"the prompt is {prompt_tokens} tokens long; the model's context length is {self.context_length}",
                "shorten the conversation (/clear), or lower --max-pixels / --fps / --max-frames")
            err.prompt_tokens, err.context_length = prompt_tokens, self.context_length  # for the server's 400
            raise err
        return Prepared(inputs, prompt_tokens, list(visual.infos), time.perf_counter() - start)

    # --- generation -----------------------------------------------------------------------

    def job(self, messages: list[dict[str, Any]], params: GenerationParams = GenerationParams(),
            prepared: Prepared | None = None, cancel: threading.Event | None = None) -> Job:
        params = params.validated()
        start = time.perf_counter() - (prepared.seconds if prepared else 0.0)
        prepared = prepared or self.prepare(messages)
        max_new = min(params.max_tokens or DEFAULT_MAX_TOKENS, self.context_length - prepared.prompt_tokens)
        return Job(prepared, params, cancel or threading.Event(), start, max_new)

    def sampling_params(self, params: GenerationParams, max_new: int) -> Any:
        """vLLM's SamplingParams as the transformers engine reads the same params: unset values
        from the checkpoint's generation_config; temperature 0 (or do_sample false) is greedy."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        gen = self.generation
        kwargs: dict[str, Any] = {"max_tokens": max_new, "stop_token_ids": sorted(self.eos_ids),
                                  "output_kind": RequestOutputKind.DELTA, "detokenize": False,
                                  "seed": params.seed}
        greedy = params.temperature == 0 or (params.temperature is None and not gen.get("do_sample", False))
        if greedy:
            kwargs["temperature"] = 0.0
        else:
            for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0)):
                given = getattr(params, name)
                kwargs[name] = given if given is not None else gen.get(name, default)
        penalty = params.repetition_penalty if params.repetition_penalty is not None else gen.get("repetition_penalty")
        if penalty is not None:
            kwargs["repetition_penalty"] = penalty
        if params.ignore_eos:
            kwargs.update(ignore_eos=True, min_tokens=max_new, stop_token_ids=[])
        return SamplingParams(**kwargs)

    def stream(self, messages: list[dict[str, Any]], params: GenerationParams = GenerationParams(),
               prepared: Prepared | None = None, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        job = self.job(messages, params, prepared, cancel)
        for _, chunk in self.run_jobs([job]):
            yield chunk

    def run_jobs(self, jobs: Sequence[Job]) -> Iterator[tuple[int, Chunk]]:
        """Every job to vLLM at once (its offline batch path); yields (job index, chunk)."""
        index = {id(job): i for i, job in enumerate(jobs)}
        pending = [list(jobs)]

        def take(free: int, wait: bool) -> list[Job]:
            return pending.pop() if pending else []

        for job, chunk in self.run_continuous(take, max_batch=max(1, len(jobs))):
            yield index[id(job)], chunk

    def run_continuous(self, take: Callable[[int, bool], Sequence[Job]], max_batch: int = 16,
                       cache_length: int | None = None) -> Iterator[tuple[Job, Chunk]]:
        """Jobs join vLLM's running batch as they come (``take(free, wait)`` as in
        Engine.run_continuous); each ends with its own final chunk. A cancelled job, or one
        whose consumer went away, is aborted in vLLM."""
        with self.lock:
            live: dict[str, tuple[Job, TokenStream]] = {}
            engine = self.llm.llm_engine
            try:
                while True:
                    for job in take(max_batch - len(live), not live):
                        live[self._add(engine, job)] = (job, self._stream(job))
                    if not live:
                        return
                    yield from self._cancelled(engine, live)
                    if live:
                        yield from self._step(engine, live)
            except BaseException as exc:  # noqa: BLE001 - translated once, here
                if live:
                    engine.abort_request(list(live))
                if isinstance(exc, (GeneratorExit, KeyboardInterrupt, QvlError)):
                    raise
                raise translate(exc) or EngineError(f"vLLM failed: {type(exc).__name__}: {_first_line(exc)}",
                                                    "rerun with QVL_DEBUG=1 for details") from exc

    def _add(self, engine: Any, job: Job) -> str:
        request_id = f"qvl-{next(_ids)}"
        engine.add_request(request_id, job.prepared.inputs, self.sampling_params(job.params, job.max_new))
        return request_id

    def _stream(self, job: Job) -> TokenStream:
        return TokenStream(self._decode, self.eos_ids, job.params.stop, job.max_new,
                           job.prepared.prompt_tokens, job.start)

    def _cancelled(self, engine: Any, live: dict[str, tuple[Job, TokenStream]]) -> Iterator[tuple[Job, Chunk]]:
        gone = [rid for rid, (job, _) in live.items() if job.cancel.is_set()]
        if gone:
            engine.abort_request(gone)
        now = time.perf_counter()
        for rid in gone:
            job, stream = live.pop(rid)
            for chunk in stream.close("cancelled", now):
                yield job, chunk

    def _step(self, engine: Any, live: dict[str, tuple[Job, TokenStream]]) -> Iterator[tuple[Job, Chunk]]:
        outputs = engine.step()
        now = time.perf_counter()
        done: list[str] = []
        for out in outputs:
            if out.request_id not in live:
                continue
            job, stream = live[out.request_id]
            if out.prompt_token_ids is not None:
                stream.prompt_tokens = len(out.prompt_token_ids)  # vLLM's own count, for the usage
            completion = out.outputs[0]
            chunks = stream.push(list(completion.token_ids), now)
            if out.finished and not stream.done:
                if completion.finish_reason == "stop":  # an end-of-sequence id vLLM left out
                    stop = completion.stop_reason
                    chunks += stream.push([stop if isinstance(stop, int) else min(self.eos_ids)], now)
                chunks += stream.close("length", now)
            for chunk in chunks:
                yield job, chunk
            if stream.done:
                done.append(out.request_id)
                if not out.finished:  # a stop string or qvl's budget ended it first
                    engine.abort_request([out.request_id])
        for rid in done:
            live.pop(rid, None)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def validate(self, params: GenerationParams) -> None:
        """Refuse what this engine does not carry through yet (the transformers engine does):
        a 400 naming the field in the server, never a silently different answer."""
        unsupported = [name for name, given in (
            ("response_format", params.grammar is not None), ("logprobs", params.logprobs),
            ("n", params.n != 1), ("logit_bias", bool(params.logit_bias)), ("min_p", params.min_p is not None),
            ("presence_penalty", params.presence_penalty is not None),
            ("frequency_penalty", params.frequency_penalty is not None)) if given]
        if unsupported:
            err = UsageError(f"{unsupported[0]} is not supported with --model-engine vllm yet",
                             "drop it, or launch the model with the transformers engine (the default)")
            err.param = unsupported[0]
            raise err

    def sampling_note(self, params: GenerationParams, repl: bool = False) -> str | None:
        """generation.sampling_note with this checkpoint's generation_config."""
        return sampling_note(params, self.generation.get("top_k"), self.generation.get("top_p"), repl)

    # --- what callers read ------------------------------------------------------------------

    def free_gpu_bytes(self) -> int | None:
        return None  # vLLM holds its share of the GPUs (--gpu-memory-utilization) from the start

    def gpu_memory_allocated(self) -> int | None:
        return None  # in vLLM's worker processes

    def release_memory(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "device": self.plan.describe(), "dtype": self.plan.dtype_name,
                "attn": "vllm", "engine": "vllm", "context_length": self.context_length,
                "load_seconds": round(self.load_seconds, 2), "notes": list(self.notes),
                **self.decoder.describe(), "warmup_seconds": 0.0}

    def close(self) -> None:
        shutdown = getattr(self.llm.llm_engine, "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()


# --- helpers ------------------------------------------------------------------------------------


def llm_kwargs(path: Path, options: EngineOptions, context_length: int | None) -> tuple[VllmPlan, dict[str, Any]]:
    """vLLM's LLM(...) arguments from qvl's engine options (and the environment it needs)."""
    from qwenvl_cli.media.vision import VisionDefaults

    on_cpu = runs_on_cpu(options.device)
    tensor = len(options.gpu_idx) if options.gpu_idx else (options.n_gpu or 1)
    pipeline = options.pipeline_parallel or 1
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        gpus: tuple[int, ...] = ()
    else:
        gpus = options.gpu_idx or tuple(range(tensor * pipeline))
        if options.gpu_idx:  # vLLM uses the first GPUs it sees: show it only these
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names = visible.split(",") if visible else [str(i) for i in range(max(gpus) + 1)]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(names[i] for i in gpus)
    dtype = options.dtype if options.dtype != "auto" else ("float32" if on_cpu else "auto")
    defaults = VisionDefaults()
    kwargs: dict[str, Any] = {
        "model": str(path), "dtype": dtype, "seed": 0, "tensor_parallel_size": tensor,
        "pipeline_parallel_size": pipeline, "enforce_eager": options.enforce_eager or on_cpu,
        "limit_mm_per_prompt": {"image": MAX_IMAGES, "video": MAX_VIDEOS},
        # vLLM sizes its encoder cache and profiling for qvl's largest image, not the processor's
        "mm_processor_kwargs": {"size": {"shortest_edge": defaults.image_min_pixels,
                                         "longest_edge": defaults.image_max_pixels}},
    }
    if options.max_model_len or context_length:
        kwargs["max_model_len"] = options.max_model_len or context_length
    if not on_cpu:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    if options.ray_address:
        os.environ["RAY_ADDRESS"] = options.ray_address
        kwargs["distributed_executor_backend"] = "ray"
    plan = VllmPlan(gpus, "float32" if dtype == "auto" and on_cpu else (dtype if dtype != "auto" else "bfloat16"),
                    tensor, pipeline, options.ray_address)
    return plan, kwargs


def vllm_prompt(text: str, images: list[Any], videos: list[Any], fps: Sequence[float],
                infos: Sequence[Any]) -> dict[str, Any]:
    """vLLM's prompt dict: the rendered template, decoded images, sampled frames (uint8
    T,H,W,3) with their metadata, and processor bounds that keep qvl's sizes."""
    prompt: dict[str, Any] = {"prompt": text}
    data: dict[str, Any] = {}
    if images:
        data["image"] = list(images)
    if videos:
        video_infos = [info for info in infos if info.kind == "video"]
        data["video"] = [(_frames(video), _metadata(info, rate)) for video, info, rate in
                         zip(videos, video_infos, list(fps) + [None] * len(videos))]
    if data:
        prompt["multi_modal_data"] = data
        pixels = [info.resized_width * info.resized_height for info in infos]
        # transformers' spelling of min_pixels / max_pixels (the old names go in 5.23)
        prompt["mm_processor_kwargs"] = {"size": {"shortest_edge": min(pixels), "longest_edge": max(pixels)}}
    return prompt


def _frames(video: Any) -> Any:
    """A float (T, C, H, W) tensor of whole values -> the uint8 (T, H, W, 3) array vLLM takes."""
    return video.round().clamp(0, 255).to(dtype=_uint8()).permute(0, 2, 3, 1).contiguous().numpy()


def _uint8() -> Any:
    import torch

    return torch.uint8


def _metadata(info: Any, fps: float | None) -> dict[str, Any]:
    frames = info.frames or 0
    rate = fps or info.sample_fps or 2.0
    return {"fps": float(rate), "total_num_frames": frames, "frames_indices": list(info.indices or range(frames)),
            "duration": frames / float(rate) if rate else 0.0, "video_backend": "qvl"}


def _quant_method(path: Path) -> str:
    config = _read_json(path / "config.json")
    return str((config.get("quantization_config") or {}).get("quant_method", "pytorch")).lower()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _quiet_vllm() -> None:
    """vLLM logs to stdout, where qvl's answers go: keep its log on stderr, at warnings unless
    debugging (its child processes inherit the environment)."""
    from qwenvl_cli import settings

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if settings.debug() else "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not settings.debug():
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
