"""Where a chat's answers come from: a model loaded in this process, or a launched server.

Both give a :class:`Backend` whose ``respond(messages, params)`` yields
:class:`~qwenvl_cli.generation.Chunk` records, so the one-shot printer and the REPL do not
care which one they talk to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from qwenvl_cli import render
from qwenvl_cli.catalogue.resolve import SpecQuery
from qwenvl_cli.fit.preflight import check_spec
from qwenvl_cli.generation import Chunk, GenerationParams

if TYPE_CHECKING:
    from qwenvl_cli.catalogue.spec import ResolvedSpec
    from qwenvl_cli.engine.engine import Engine
    from qwenvl_cli.engine.options import EngineOptions

Respond = Callable[[list[dict[str, Any]], GenerationParams], Iterator[Chunk]]


@dataclass
class Backend:
    name: str
    respond: Respond
    info: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class LocalRequest:
    """What to load: a resolved spec (downloaded if needed) or a local folder."""

    spec: ResolvedSpec | None = None
    model_path: str | None = None
    revision: str | None = None
    offline: bool = False
    quiet: bool = False
    verbose: bool = False
    interactive: bool = False  # the REPL: notes name /set, not flags


def resolve_for_loading(query: SpecQuery, engine_options: EngineOptions, model_path: str | None,
                        force: bool, quiet: bool = False) -> tuple[ResolvedSpec | None, EngineOptions]:
    """Check the spec before anything is downloaded (fit.preflight.check_spec), then place the
    model on the GPUs the fit check chose when the user named none.

    Returns (spec or None, engine options)."""
    gpu_idx = ",".join(map(str, engine_options.gpu_idx)) if engine_options.gpu_idx else None
    vllm = engine_options.engine == "vllm"  # vLLM has its own AWQ / GPTQ kernels
    result = check_spec(query, gpu_idx=gpu_idx, device=engine_options.device, model_path=model_path,
                        force=force, quiet=quiet, need_backend=not vllm)
    if result is None:
        return None, engine_options
    options = replace(engine_options, model_format=result.spec.model_format)
    if vllm:  # -s auto may have picked a format vLLM cannot serve here
        from qwenvl_cli.engine.vllm_check import check_format

        check_format(options, options.model_format)
    if result.placement and not (options.gpu_idx or options.n_gpu) and options.device != "cpu":
        options = replace(options, gpu_idx=tuple(g.index for g in result.placement.gpus))
    return result.spec, options


def load_engine(request: LocalRequest, engine_options: EngineOptions) -> tuple[Engine, str]:
    """Download (if needed) and load the model in this process; report the load on stderr.

    Returns the Engine and the name to show for it."""
    from qwenvl_cli.engine.choose import engine_class
    from qwenvl_cli.hub import download as hub

    if request.model_path:
        local = hub.local_model_from_path(request.model_path, request.spec)
    else:
        local = hub.ensure_local(request.spec, revision=request.revision,
                                 offline=True if request.offline else None, quiet=request.quiet)
    name = request.spec.label() if request.spec is not None and not request.model_path else str(local.path)
    context = request.spec.family.context_length if request.spec is not None else None
    with render.spinner(f"loading {name}", quiet=request.quiet):
        engine = engine_class(engine_options).load(local.path, engine_options, context_length=context)
    for note in engine.notes:
        render.warn(note)
    if not request.quiet:
        described = engine.describe()
        render.status(f"loaded {name} on {described['device']} ({described['dtype']}, {described['attn']}) "
                      f"in {engine.load_seconds:.1f} s")
    return engine, name


def load_local(request: LocalRequest, engine_options: EngineOptions) -> Backend:
    """The model loaded in this process, as a Backend for the chat."""
    engine, name = load_engine(request, engine_options)
    described = engine.describe()

    shown: set[str] = set()  # each sampling note once, not on every message of a chat

    def respond(messages: list[dict[str, Any]], params: GenerationParams) -> Iterator[Chunk]:
        note = engine.sampling_note(params, repl=request.interactive)
        if note and not request.quiet and note not in shown:
            shown.add(note)
            render.warn(note)
        prepared = engine.prepare(messages)
        for info in prepared.media if not request.quiet else ():
            if request.verbose:
                render.status(info.describe())
            note = info.cap_note()
            if note:
                render.status(note)
        yield from engine.stream(messages, params, prepared=prepared)

    return Backend(name, respond, {"model": name, **described})
