"""Where a chat's answers come from: a model loaded in this process, or a launched server.

Both give a :class:`Backend` whose ``respond(messages, params)`` yields
:class:`~qvl_cli.generation.Chunk` records, so the one-shot printer and the REPL do not
care which one they talk to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import render
from .generation import Chunk, GenerationParams

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

    spec: Any = None  # specs.ResolvedSpec
    model_path: str | None = None
    revision: str | None = None
    offline: bool = False
    quiet: bool = False
    verbose: bool = False


def check_spec(spec_flags: dict[str, Any], *, gpu_idx: str | None = None, device: str = "auto",
               model_path: Any = None, force: bool = False, workload: Any = None,
               need_backend: bool = True, quiet: bool = False, announce: bool = False) -> Any:
    """Everything checked before a download: resolve the spec flags (``-s auto`` included),
    make sure the AWQ / GPTQ backend is installed (``need_backend``), refuse what will not
    fit the GPUs unless ``force``; ``announce`` prints the estimate next to the free memory. Returns the fit.FitResult, or None for a --model-path
    given without spec flags (nothing to resolve)."""
    from . import fit, quant

    if model_path is not None and all(v is None for v in spec_flags.values()):
        return None
    kwargs = {"workload": workload} if workload is not None else {}
    result = fit.resolve_and_check(**spec_flags, gpu_idx=gpu_idx, **kwargs)
    if result.choice and result.choice.reason and not quiet:
        render.status(result.choice.reason)
    if model_path is None and need_backend:
        quant.require_backend(result.spec.model_format, device)
    if announce and not quiet and result.estimate is not None and result.fits is not None:
        render.status(f"{result.spec.label()}: needs {result.estimate.describe()}; "  # next to the free memory
                      f"GPUs: {result.report.describe()}; fits: {result.verdict}")
    if model_path is None:
        result.require(force)
    return result


def load_engine(request: LocalRequest, engine_options: Any) -> tuple[Any, str]:
    """Download (if needed) and load the model in this process; report the load on stderr.

    Returns the Engine and the name to show for it."""
    from . import hub
    from .engine import Engine

    if request.model_path:
        local = hub.local_model_from_path(request.model_path, request.spec)
    else:
        local = hub.ensure_local(request.spec, revision=request.revision,
                                 offline=True if request.offline else None, quiet=request.quiet)
    name = request.spec.label() if request.spec is not None and not request.model_path else str(local.path)
    context = request.spec.family.context_length if request.spec is not None else None
    with render.spinner(f"loading {name}", quiet=request.quiet):
        engine = Engine.load(local.path, engine_options, context_length=context)
    for note in engine.notes:
        render.warn(note)
    if not request.quiet:
        described = engine.describe()
        render.status(f"loaded {name} on {described['device']} ({described['dtype']}, {described['attn']}) "
                      f"in {engine.load_seconds:.1f} s")
    return engine, name


def load_local(request: LocalRequest, engine_options: Any) -> Backend:
    """The model loaded in this process, as a Backend for the chat."""
    engine, name = load_engine(request, engine_options)
    described = engine.describe()

    def respond(messages: list[dict[str, Any]], params: GenerationParams) -> Iterator[Chunk]:
        note = engine.sampling_note(params)
        if note and not request.quiet:
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
