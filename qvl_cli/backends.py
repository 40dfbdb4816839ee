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


def load_local(request: LocalRequest, engine_options: Any) -> Backend:
    """Download (if needed) and load the model in this process; report the load on stderr."""
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
    described = engine.describe()
    for note in engine.notes:
        render.warn(note)
    if not request.quiet:
        render.status(f"loaded {name} on {described['device']} ({described['dtype']}, {described['attn']}) "
                      f"in {engine.load_seconds:.1f} s")

    def respond(messages: list[dict[str, Any]], params: GenerationParams) -> Iterator[Chunk]:
        note = engine.sampling_note(params)
        if note and not request.quiet:
            render.warn(note)
        prepared = engine.prepare(messages)
        if request.verbose:
            for info in prepared.media:
                render.status(info.describe())
        yield from engine.stream(messages, params, prepared=prepared)

    return Backend(name, respond, {"model": name, **described})
