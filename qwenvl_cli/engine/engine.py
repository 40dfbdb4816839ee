"""The transformers engine (torch and transformers are imported only in the engine/ wing).

``Engine.load`` loads Qwen2VLForConditionalGeneration and its processor; ``Engine.stream``
turns a conversation into :class:`~qwenvl_cli.generation.Chunk` records. qvl's decode loop
runs on the calling thread step by step; transformers' ``generate`` runs on a worker thread
that always ends its stream (errors are re-raised in the caller, and a consumer that stops
reading cancels the generation).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwenvl_cli.engine import devices, quant
from qwenvl_cli.engine.options import EngineOptions
from qwenvl_cli.engine.streaming import END, QueueStreamer, cancel_criteria
from qwenvl_cli.errors import EngineError, OutOfMemory, PromptTooLarge, PromptTooLong, QvlError, translate
from qwenvl_cli.fit import packages
from qwenvl_cli.generation import DEFAULT_MAX_TOKENS, Chunk, GenerationParams, TokenStream, sampling_note


@dataclass
class Prepared:
    """Model inputs for one conversation, with what the user may want to see about them."""

    inputs: Any
    prompt_tokens: int
    media: list[Any] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Job:
    """One request ready to decode: its inputs, options, cancel flag and token budget."""

    prepared: Prepared
    params: GenerationParams
    cancel: threading.Event
    start: float
    max_new: int


class Engine:
    def __init__(self, model: Any, processor: Any, plan: devices.Plan, path: Path,
                 context_length: int, load_seconds: float, notes: tuple[str, ...] = (),
                 decoder: Any = None) -> None:
        from qwenvl_cli.engine import fastpath

        self.model = model
        self.notes = notes  # what the user should know about how it runs (print them on stderr)
        self.processor = processor
        self.plan = plan
        self.path = path
        self.context_length = context_length
        self.load_seconds = load_seconds
        self.lock = threading.Lock()  # one generation at a time on one model
        # model.generate, or qvl's fast loop: called with generate's arguments
        self.decoder = decoder or fastpath.make_decoder(model, fastpath.DecodeConfig(), context_length)
        self.warmup_seconds = 0.0
        from qwenvl_cli.catalogue.dims import from_config

        self.dims = from_config(model.config.to_dict())  # for the memory check of each prompt
        from qwenvl_cli.media.vision import VisionDefaults

        self.vision_defaults = VisionDefaults()  # qvl's defaults: images at most 1280*28*28 pixels
        tokenizer = processor.tokenizer
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, options: EngineOptions = EngineOptions(),
             context_length: int | None = None) -> Engine:
        path = Path(path)
        start = time.perf_counter()
        quantized = quant.inspect(path)  # AWQ / GPTQ, whatever --model-format said
        if quantized:  # the packages first, before torch is imported; the CPU kernels below
            packages.require_backend(quantized.method, "cpu" if options.device == "cpu" else "cuda")
            options = replace(options, model_format=quantized.method)
        _quiet_libraries()
        import torch
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        from qwenvl_cli.engine import fastpath

        plan = devices.plan(torch, options)
        decode = fastpath.resolve(options, bool(plan.gpus), len(plan.gpus) <= 1, plan.attn)
        notes = list(plan.notes)
        try:
            extra = _quantized_load_kwargs(path, quantized, plan, notes) if quantized else {}
            model = Qwen2VLForConditionalGeneration.from_pretrained(
                path, dtype=plan.dtype, attn_implementation=fastpath.attn_implementation(plan.attn, decode),
                **plan.load_kwargs, **extra)
            if plan.device_map is None:
                model.to(plan.device)
            if quantized and not plan.gpus:
                quant.drop_compiled_kernels(model)
            model.eval()
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError, NameError) as exc:
            raise translate(exc) or EngineError(
                f"cannot load the model from {path}: {type(exc).__name__}: {_first_line(exc)}",
                "check that the folder holds a complete Qwen2-VL checkpoint (`qvl verify`)") from exc
        context = context_length or getattr(model.config.get_text_config(), "max_position_embeddings", 32768)
        engine = cls(model, processor, plan, path, context, time.perf_counter() - start, tuple(notes),
                     decoder=fastpath.make_decoder(model, decode, context))
        if options.warmup:
            engine.warmup()
        return engine

    def warmup(self, batches: Sequence[int] = (1, 2), up_to: int | None = None) -> float:
        """Compile / capture the decode step ahead of the first request (what `qvl launch` pays
        before it says ready) for these batch sizes and every cache bucket up to ``up_to``
        positions (4096); returns and keeps the seconds it took (0 when nothing to do).
        With torch.compile, batch 1 and batch 2 compile the two graphs every later shape
        reuses (only a CUDA graph is recorded for a new shape)."""
        from qwenvl_cli.engine import fastpath

        with self.lock:
            seconds = self.decoder.warmup(batches, min(up_to or fastpath.DEFAULT_WARMUP_LENGTH,
                                                       self.context_length))
        self.warmup_seconds += seconds
        return seconds

    # --- inputs ---------------------------------------------------------------------------

    def prepare(self, messages: list[dict[str, Any]], policy: Any = None) -> Prepared:
        """Render the chat template, load and size the media, tokenize: the model inputs.

        ``policy`` (a media.MediaPolicy) limits what the media may be: the server passes
        its own so that a request cannot read local files; the default allows everything."""
        from qwenvl_cli.engine import vision
        from qwenvl_cli.media import sources as media

        start = time.perf_counter()
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        visual = vision.prepare_vision(messages, self.vision_defaults, policy or media.PERMISSIVE)
        inputs = self.processor(text=[text], images=visual.images, videos=visual.videos, padding=True,
                                return_tensors="pt", **visual.processor_kwargs(),
                                **self._preprocess_kwargs(visual.images, visual.videos))
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        if prompt_tokens >= self.context_length:
            err = PromptTooLong(
                f"the prompt is {prompt_tokens} tokens long; the model's context length is {self.context_length}",
                "shorten the conversation (/clear), or lower --max-pixels / --fps / --max-frames")
            err.prompt_tokens, err.context_length = prompt_tokens, self.context_length  # for the server's 400
            raise err
        infos = vision.processed_infos(list(visual.infos), inputs, self.processor)  # what the model gets
        return Prepared(inputs, prompt_tokens, infos, time.perf_counter() - start)

    # --- generation -----------------------------------------------------------------------

    def generate_kwargs(self, params: GenerationParams, max_new_tokens: int) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` from the params over the checkpoint defaults."""
        from qwenvl_cli.engine import sampling

        return sampling.generate_kwargs(params, max_new_tokens, self.pad_id, self.eos_ids)

    def validate(self, params: GenerationParams) -> None:
        """What only the loaded model can check (logit_bias ids, response_format's schema)."""
        from qwenvl_cli.engine import sampling

        sampling.validate(self, params)

    def job(self, messages: list[dict[str, Any]], params: GenerationParams = GenerationParams(),
            prepared: Prepared | None = None, cancel: threading.Event | None = None) -> Job:
        """Validate and prepare one request; errors here concern this request alone."""
        params = params.validated()
        start = time.perf_counter() - (prepared.seconds if prepared else 0.0)
        prepared = prepared or self.prepare(messages)
        budget = self.context_length - prepared.prompt_tokens
        max_new = min(params.max_tokens or DEFAULT_MAX_TOKENS, budget)
        self.check_memory(prepared, max_new)
        return Job(prepared, params, cancel or threading.Event(), start, max_new)

    def check_memory(self, prepared: Prepared, max_new: int) -> None:
        """On a GPU, refuse a prompt whose images, video and KV cache need more memory than
        is free, with the figures, instead of failing half-way with an out-of-memory error."""
        if not self.plan.gpus or self.dims is None:
            return
        import torch

        from qwenvl_cli.fit.memory import prompt_bytes

        visual = sum(info.tokens for info in prepared.media)
        need = prompt_bytes(self.dims, prepared.prompt_tokens, visual, max_new)
        device = torch.device(self.plan.input_device)
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)
        if need > free:
            raise PromptTooLarge(
                f"this prompt ({prepared.prompt_tokens:,} tokens, {visual:,} of them visual) needs ~{need / 2**30:.1f} "
                f"GiB more; {self.plan.input_device} has {free / 2**30:.1f} GiB free",
                "lower --max-pixels, --fps or --max-frames, or --max-tokens")

    def stream(self, messages: list[dict[str, Any]], params: GenerationParams = GenerationParams(),
               prepared: Prepared | None = None, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Yield text deltas, then a final chunk with finish reason, usage and timings.

        Closing the iterator early (break, Ctrl-C, a client that went away) or setting
        ``cancel`` stops the generation; the worker thread is always joined.
        """
        job = self.job(messages, params, prepared, cancel)
        for _, chunk in self.run_jobs([job]):
            yield chunk

    def run_jobs(self, jobs: Sequence[Job]) -> Iterator[tuple[int, Chunk]]:
        """Decode several requests as one left-padded batch; yields (job index, chunk).

        The jobs must share ``params.batch_key()``. Each job ends with its own final
        chunk as soon as it is done; a job whose ``cancel`` is set ends as "cancelled"
        while the others go on; generation stops once every job is done.
        """
        keys = {job.params.batch_key() for job in jobs}
        if len(keys) != 1:
            raise ValueError("jobs in one batch must share their sampling parameters")
        with self.lock:
            yield from self._run(list(jobs))

    def run_continuous(self, take: Callable[[int, bool], Sequence[Job]], max_batch: int = 16,
                       cache_length: int | None = None) -> Iterator[tuple[Job, Chunk]]:
        """Decode jobs as they come (continuous batching); yields (job, chunk).

        ``take(free, wait)`` returns up to ``free`` new jobs; it is called between decode
        steps with ``wait`` False (return at once), and with ``wait`` True when nothing is
        running (block until work comes; return nothing to end the run). A job joins the
        running batch as soon as a row is free and ends with its own final chunk. With
        transformers' generate or the eager step, jobs are batched statically instead
        (the ones waiting when a batch starts). See :mod:`qwenvl_cli.engine.continuous`.
        """
        from qwenvl_cli.engine import continuous

        with self.lock:
            yield from continuous.run(self, take, max_batch, cache_length)

    def collate(self, prepared: Sequence[Prepared]) -> dict[str, Any]:
        """Left-pad the token rows of several prepared requests and concatenate their pixels."""
        import torch

        rows = [p.inputs for p in prepared]
        length = max(int(r["input_ids"].shape[-1]) for r in rows)
        out: dict[str, Any] = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
            if key not in rows[0]:
                continue
            batch = torch.full((len(rows), length), fill, dtype=rows[0][key].dtype)
            for i, row in enumerate(rows):
                n = int(row[key].shape[-1])
                batch[i, length - n:] = row[key][0]
            out[key] = batch
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [r[key] for r in rows if key in r and r[key] is not None]
            if parts:
                out[key] = torch.cat(parts, dim=0)
        return out

    def _run(self, jobs: list[Job]) -> Iterator[tuple[int, Chunk]]:
        from qwenvl_cli.engine import sampling

        kwargs = self.generate_kwargs(jobs[0].params, max(j.max_new for j in jobs))
        rows = [(i, job, k) for i, job in enumerate(jobs) for k in range(job.params.n)]  # n answers: n rows
        inputs = jobs[0].prepared.inputs if len(rows) == 1 else self.collate([j.prepared for _, j, _ in rows])
        inputs = {k: v.to(self.plan.input_device) for k, v in inputs.items()}
        extra, recorder = sampling.extra_processors(self, jobs[0].params, int(inputs["input_ids"].shape[-1]),
                                                    len(rows))
        if extra:
            kwargs["logits_processor"] = extra
        streams = [TokenStream(self._decode, self.eos_ids, j.params.stop, j.max_new,
                               j.prepared.prompt_tokens, j.start, k) for _, j, k in rows]
        # qvl's decode loop runs on this thread, step by step; transformers' generate needs
        # a thread of its own to stream. Running torch on one thread also spares a CPU the
        # cost of several OpenMP thread teams (docs/performance.md, engine overhead).
        steps = self._inline_steps if hasattr(self.decoder, "iterate") else self._threaded_steps
        try:
            for step in steps(inputs, kwargs, jobs[0].params.seed, streams):
                now = time.perf_counter()
                scores = recorder.take(step) if recorder is not None else None
                for r, ((i, job, _), stream) in enumerate(zip(rows, streams)):
                    chunks = stream.close("cancelled", now) if job.cancel.is_set() else \
                        stream.push(step[r:r + 1], now, scores[r:r + 1] if scores else None)
                    for chunk in chunks:
                        yield i, chunk
                if all(s.done for s in streams):
                    break
        except BaseException as exc:  # noqa: BLE001 - translated once, here
            if isinstance(exc, (GeneratorExit, KeyboardInterrupt, QvlError)):
                raise
            if type(exc).__name__ == "OutOfMemoryError":
                raise self._out_of_memory(jobs) from exc
            raise translate(exc) or EngineError(
                f"generation failed: {type(exc).__name__}: {_first_line(exc)}",
                "rerun with QVL_DEBUG=1 for details") from exc
        now = time.perf_counter()
        for (i, job, _), stream in zip(rows, streams):
            for chunk in stream.close("cancelled" if job.cancel.is_set() else "length", now):
                yield i, chunk

    def _inline_steps(self, inputs: dict[str, Any], kwargs: dict[str, Any], seed: int | None,
                      streams: list[TokenStream]) -> Iterator[list[int]]:
        """qvl's decode loop on the calling thread; closing this generator stops it."""
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        steps = self.decoder.iterate(**inputs, **kwargs)
        try:
            yield from steps
        finally:
            steps.close()

    def _threaded_steps(self, inputs: dict[str, Any], kwargs: dict[str, Any], seed: int | None,
                        streams: list[TokenStream]) -> Iterator[list[int]]:
        """transformers' generate on a worker thread that always ends its stream; its errors
        are raised here, and closing this generator stops and joins it."""
        if "logits_processor" in kwargs:
            from qwenvl_cli.engine.sampling import generate_with_processors

            kwargs = generate_with_processors(self.model, inputs["input_ids"], kwargs)
        tokens: queue.Queue = queue.Queue()
        streamer = QueueStreamer(tokens, END)
        stop_all = threading.Event()
        worker = threading.Thread(target=self._generate_worker, name="qvl-generate", daemon=True,
                                  args=(inputs, dict(kwargs, streamer=streamer,
                                                     stopping_criteria=cancel_criteria(stop_all)),
                                        seed, streamer, tokens))
        worker.start()
        try:
            while True:
                item = tokens.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop_all.set()
            worker.join()

    def _out_of_memory(self, jobs: Sequence[Job]) -> OutOfMemory:
        """One line with the figures, after giving the cached blocks back so that the next
        request can run."""
        prompts = "+".join(str(j.prepared.prompt_tokens) for j in jobs)
        where = self.plan.input_device
        used = ""
        if self.plan.gpus:
            import torch

            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(torch.device(where))
            used = f": {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use"
        return OutOfMemory(f"out of memory on {where} while generating for {len(jobs)} request(s) of "
                           f"{prompts} prompt tokens{used}",
                           "lower --max-pixels / --max-tokens, use a quantized spec (-f awq), or more GPUs")

    def sampling_note(self, params: GenerationParams, repl: bool = False) -> str | None:
        """generation.sampling_note with this checkpoint's generation_config."""
        gen = self.model.generation_config
        return sampling_note(params, gen.top_k, gen.top_p, repl)

    def _preprocess_kwargs(self, images: Any, videos: Any) -> dict[str, Any]:
        """Normalise and patch the pixels on the GPU (the processor's torchvision backend)."""
        if (images or videos) and getattr(self.decoder.config, "gpu_preprocess", False):
            return {"device": self.plan.input_device}
        return {}

    def _generate_worker(self, inputs, kwargs, seed, streamer, tokens) -> None:
        import torch

        try:
            with torch.inference_mode():
                if seed is not None:
                    torch.manual_seed(seed)
                self.decoder.generate(**inputs, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            tokens.put(exc)
        finally:
            streamer.end()

    def _decode(self, ids: Sequence[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)

    def free_gpu_bytes(self) -> int | None:
        """Free memory on the smallest of the model's GPUs times their count; None on CPU."""
        if not self.plan.gpus:
            return None
        import torch

        return min(torch.cuda.mem_get_info(g)[0] for g in self.plan.gpus) * len(self.plan.gpus)

    def gpu_memory_allocated(self) -> int | None:
        """Bytes torch has allocated on the model's GPUs; None on CPU."""
        if not self.plan.gpus:
            return None
        import torch

        return int(sum(torch.cuda.memory_allocated(g) for g in self.plan.gpus))

    def release_memory(self) -> None:
        """Give torch's cached GPU blocks back (after an out-of-memory error)."""
        if self.plan.gpus:
            import torch

            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "device": self.plan.describe(), "dtype": self.plan.dtype_name,
                "attn": self.plan.attn, "context_length": self.context_length,
                "load_seconds": round(self.load_seconds, 2), "notes": list(self.notes),
                **self.decoder.describe(), "warmup_seconds": round(self.warmup_seconds, 2)}


def _quantized_load_kwargs(path: Path, quantized: quant.Quantized, plan: devices.Plan,
                           notes: list[str]) -> dict[str, Any]:
    """Check the backend for the planned device, import it quietly, and return the
    ``from_pretrained`` arguments: the config with the normalised quantization config."""
    from transformers import AutoConfig

    backend = packages.require_backend(quantized.method, "cuda" if plan.gpus else "cpu")
    notes += [*quantized.notes, *backend.notes]
    _import_quant_backend(quantized.method)
    config = AutoConfig.from_pretrained(path)
    config.quantization_config = quantized.load_config(on_gpu=bool(plan.gpus))
    return {"config": config}


def _import_quant_backend(method: str) -> None:
    """Import gptqmodel (and optimum) with its start-up banner and logs kept off stdout.

    gptqmodel prints a banner, environment changes and warnings on stdout when imported,
    where qvl's answers go. They are dropped (shown on stderr with QVL_DEBUG=1), and its
    logger is then kept to errors. Called after the device plan, so that the
    CUDA_DEVICE_ORDER it sets for its own use does not renumber the GPUs qvl planned on.
    """
    import contextlib
    import importlib
    import io
    import logging
    import sys

    from qwenvl_cli import settings

    debug = settings.debug()
    with contextlib.redirect_stdout(sys.stderr if debug else io.StringIO()):
        importlib.import_module("gptqmodel")
        if method == "gptq":
            importlib.import_module("optimum.gptq")
    if not debug:
        logging.getLogger("logbar").setLevel(logging.ERROR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _quiet_libraries() -> None:
    """Keep transformers' warnings and progress bars off the user's terminal unless debugging."""
    from qwenvl_cli import settings

    if settings.debug():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
