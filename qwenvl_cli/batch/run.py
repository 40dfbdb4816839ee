"""`qvl batch`: answer every conversation of a JSONL file, fast, resumably.

Order of work: flags and the whole input file are checked first (duplicate ids stop the
run before anything else), the output is locked and read (ids answered before are
skipped), lines that cannot run are written as error records, and only then is the model
loaded (or the server asked). Records are appended and flushed one by one, so Ctrl-C or
a crash loses only the requests in flight.

Exit codes: 0 every request answered, 1 some failed (their records carry ``error``),
2 bad usage (flags, duplicate ids, an output file that is not ours), 130 interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenvl_cli import render
from qwenvl_cli.batch import files as batch_io
from qwenvl_cli.batch import plan as batch_plan
from qwenvl_cli.batch.files import BadLine, Request, record
from qwenvl_cli.batch.progress import BatchProgress, Tally
from qwenvl_cli.catalogue.resolve import SpecQuery
from qwenvl_cli.engine.options import EngineOptions
from qwenvl_cli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, UsageError
from qwenvl_cli.generation import DEFAULT_MAX_TOKENS, GenerationParams
from qwenvl_cli.media.vision import media_options


@dataclass(frozen=True)
class BatchCommand:
    """Everything `qvl batch` was given."""

    input: Path
    output: Path
    query: SpecQuery = SpecQuery()
    model_path: str | None = None
    revision: str | None = None
    offline: bool = False
    force: bool = False
    endpoint: str | None = None
    model_uid: str | None = None  # a model started with `qvl launch` (or the model's name at --endpoint)
    api_key: str | None = None
    batch_size: str | None = None  # a number, or auto / None
    media_flags: dict[str, Any] = field(default_factory=dict)
    params: GenerationParams = GenerationParams()
    engine_options: EngineOptions = EngineOptions()
    fail_fast: bool = False
    quiet: bool = False
    cluster: str | None = None  # a Ray cluster's address: a pool of engine actors there (batch/cluster.py)
    prompt: str | None = None  # for a folder of images or a Parquet file (batch/captions.py)


class _FailFast(Exception):
    """Raised by the writer at the first failure under --fail-fast."""


def run(request: BatchCommand) -> int:
    """The whole `qvl batch` command; returns the exit code."""
    params = request.params.validated()
    size = batch_plan.parse_batch_size(request.batch_size)
    batch_io.check_output(request.output, request.input)  # exit 2 before any model loads
    target = _target(request)
    image_opts, video_opts = media_options(request.media_flags)
    items = batch_io.read_input(request.input, params, image_opts, video_opts, request.prompt)
    if not items:
        raise UsageError(f"{request.input} holds no requests",
                         'write one JSON object per line: {"id": 1, "messages": [...]}')
    local = None if target is not None else _check_spec(request)  # before the output is touched
    output, existing = batch_io.open_output(request.output, request.input)
    todo = list(batch_io.pending(items, existing))
    tally = Tally(total=len(todo), skipped=len(items) - len(todo))
    retried = sum(1 for item in todo if isinstance(item, Request) and batch_io.id_key(item.id) in existing.failed)
    if retried and not request.quiet:
        render.status(f"retrying {retried} request(s) that failed in an earlier run")
    try:
        if not todo:
            if not request.quiet:
                render.status(f"nothing to do: all {len(items)} requests are answered in {request.output}")
            return EXIT_OK
        with BatchProgress(tally, quiet=request.quiet) as progress:
            _answer(request, target or local, todo, size, _writer(output, tally, progress, request.fail_fast), tally)
    except _FailFast:
        render.status(f"stopped at the first failure (--fail-fast); {tally.summary(interrupted=True)}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        render.status(f"interrupted: {tally.summary(interrupted=True)}; rerun the same command to resume")
        return EXIT_INTERRUPTED
    finally:
        tally.ended = tally.ended or _now()
        output.close()
    if not request.quiet or tally.failed:
        render.status(tally.summary())
    return EXIT_FAILURE if tally.failed else EXIT_OK


def _target(request: BatchCommand) -> Any:
    """The server to send the requests to (remote.pick_target, as `qvl chat` picks it), or
    None to load the model here. Spec flags and --model-path do not mix with a server."""
    from qwenvl_cli.backend import remote

    in_process = request.model_path is not None or request.query.given
    if request.cluster and (request.endpoint or request.model_uid):
        raise UsageError("--cluster runs the model on the cluster's nodes: --endpoint / --model-uid do not apply",
                         "drop one of them")
    if request.cluster:
        return None
    if in_process and (request.endpoint or request.model_uid):
        raise UsageError("--endpoint / --model-uid send the requests to a server: spec flags and --model-path "
                         "do not apply", "drop them, or drop --endpoint / --model-uid to load the model here")
    return remote.pick_target(request.endpoint, request.model_uid, request.api_key, in_process)


def _writer(output: batch_io.Output, tally: Tally, progress: BatchProgress, fail_fast: bool):
    def emit(rec: dict[str, Any]) -> None:
        output.write(rec)
        tally.add(rec)
        progress.update()
        if fail_fast and rec["error"] is not None:
            render.error(f"id {batch_io.id_key(rec['id'])}: {rec['error']}", None)
            raise _FailFast()
    return emit


def _answer(request: BatchCommand, source: Any, todo: list[Request | BadLine], size: int | None, emit,
            tally: Tally) -> None:
    """Write the bad lines' records, then answer the rest through the server (``source`` a
    remote.Target) or with the model loaded here (``source`` the checked spec and options)."""
    good = []
    for item in todo:
        problem = item.error if isinstance(item, BadLine) else _media_problem(item)
        if problem is None:
            good.append(item)
        else:  # a bad line, or a local file that is missing or not an image: no model needed to say so
            emit(record(item.id, error=problem))
    if not good:
        return
    if not isinstance(source, tuple):
        from qwenvl_cli.batch import remote as batch_remote

        tally.started, tally.timed = _now(), True
        batch_remote.run(source, good, size or batch_plan.REMOTE_CONCURRENCY, emit, quiet=request.quiet)
        return
    if request.cluster:
        from qwenvl_cli.batch import cluster as batch_cluster

        tally.started = _now()
        batch_cluster.run(request.cluster, *source, request, good, size or batch_plan.CLUSTER_BATCH, emit)
        return
    from qwenvl_cli.batch import local as batch_local

    engine = _load(request, *source)
    sizing = _sizing(engine, good, size, request.media_flags.get("max_pixels"))
    if sizing.reason and not request.quiet:
        render.status(sizing.reason)
    tally.started, tally.timed = _now(), True  # speed is measured from the first batch, not from the load
    batch_local.run(engine, batch_plan.plan_batches(good, sizing.size), emit)


def _media_problem(request: Request) -> str | None:
    """Why the request's local media cannot be read (missing, not an image, too many pixels),
    checked before any model is loaded; URLs and data URIs are left to the run."""
    from qwenvl_cli import messages as msgs
    from qwenvl_cli.errors import MediaError
    from qwenvl_cli.media import sources, vision

    for message in request.messages:
        for part in message["content"]:
            kind = part.get("type")
            if kind not in ("image", "video"):
                continue
            refs = part[kind] if isinstance(part[kind], list) else [part[kind]]
            check = sources.resolve_image if kind == "image" or len(refs) > 1 else sources.resolve_video
            try:
                for ref in refs:
                    if isinstance(ref, str) and msgs.local_path(ref) is not None:
                        vision.check_shape(check(ref))
            except MediaError as exc:
                return f"line {request.line}: {batch_io.error_text(exc)}"
    return None


def _check_spec(request: BatchCommand) -> tuple[Any, Any]:
    """(spec or None, engine options): the spec resolved and checked (backend installed,
    memory fit) before anything is written or downloaded, as `qvl chat` does."""
    from qwenvl_cli.backend.local import resolve_for_loading

    # With --cluster each actor checks the fit against its own node's GPUs (batch/cluster.py).
    return resolve_for_loading(request.query, request.engine_options, request.model_path,
                               request.force or bool(request.cluster), quiet=request.quiet)


def _load(request: BatchCommand, spec: Any, options: Any) -> Any:
    from qwenvl_cli.backend.local import LocalRequest, load_engine

    engine, _name = load_engine(LocalRequest(spec, request.model_path, request.revision, request.offline,
                                             request.quiet), options)
    return engine


VLLM_BATCH = 64  # requests handed to vLLM together with --batch-size auto


def _sizing(engine: Any, requests: list[Request], size: int | None, max_pixels: int | None) -> batch_plan.Sizing:
    """The batch size given, or the one --batch-size auto picks for the largest request."""
    if size is not None:
        return batch_plan.Sizing(size, "")
    if getattr(engine, "name", None) == "vllm":  # vLLM's scheduler fits them into its KV cache
        size = min(len(requests), VLLM_BATCH)
        return batch_plan.Sizing(size, f"batch size {size}: handed to vLLM at once (its scheduler "
                                       "batches them within its KV cache)")
    on_gpu = bool(engine.plan.gpus)
    dims, free = None, None
    if on_gpu:
        dims = engine.dims  # from the loaded model's config
        free = engine.free_gpu_bytes()
    videos = max(r.size[0] for r in requests)
    images = max(r.size[1] for r in requests)
    chars = max(r.size[2] for r in requests)
    max_new = max(r.params.max_tokens or DEFAULT_MAX_TOKENS for r in requests)
    frames = 768 if videos else 0  # qwen-vl-utils' most frames: the video token budget's bound
    text_tokens = chars // 2 + 64  # generous: 2 characters a token, plus the chat template
    return batch_plan.auto_batch_size(dims, free, on_gpu, len(requests), text_tokens, max_new,
                                      images=images, frames=frames * videos, max_pixels=max_pixels)


def _now() -> float:
    import time

    return time.perf_counter()
