"""`qvl chat`: check everything the user gave, pick the model, then answer once or run the REPL.

Order matters for users: flags, prompt and media are checked first (a typo in a path
fails in milliseconds), then the spec is resolved and its memory fit checked, and only
then is anything downloaded or loaded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from qwenvl_cli import messages as msgs
from qwenvl_cli import render, settings
from qwenvl_cli.backend.local import Backend, LocalRequest, load_local, resolve_for_loading
from qwenvl_cli.catalogue.resolve import SpecQuery
from qwenvl_cli.chat.session import ChatSession, line_reader, run_repl
from qwenvl_cli.engine.options import EngineOptions
from qwenvl_cli.errors import UsageError
from qwenvl_cli.generation import Answer, GenerationParams, stats_line
from qwenvl_cli.media.vision import media_options


@dataclass(frozen=True)
class ChatCommand:
    """Everything `qvl chat` was given, checked by :func:`run` in the order users need."""

    prompt: str | None = None
    query: SpecQuery = SpecQuery()
    model_path: str | None = None
    revision: str | None = None
    offline: bool = False
    force: bool = False
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    media_flags: dict[str, Any] = field(default_factory=dict)  # min_pixels, max_pixels, fps, ...
    system: str | None = None
    params: GenerationParams = GenerationParams()
    engine_options: EngineOptions = EngineOptions()
    json_output: bool = False
    stats: bool = False
    verbose: bool = False
    quiet: bool = False
    endpoint: str | None = None  # --endpoint URL: any OpenAI-compatible server
    model_uid: str | None = None  # --model-uid UID: a model `qvl launch` started
    api_key: str | None = None


def checked_media(kind: str, ref: str) -> Any:
    """Probe an image or video reference now (exists, readable, within limits) and return the
    checked value (media.sources.ImageSource / VideoSource), which the engine uses as it is."""
    from qwenvl_cli.media import sources, vision

    source = (sources.resolve_image if kind == "image" else sources.resolve_video)(ref)
    vision.check_shape(source)  # the aspect ratio too, not only after the model has loaded
    return source


def check_media(kind: str, ref: str) -> str:
    """The REPL's check of /image and /video: probe now, keep the reference as typed (/save
    writes local paths absolute)."""
    checked_media(kind, ref)
    return ref


def read_prompt(prompt: str | None) -> str | None:
    if prompt == "-":
        text = sys.stdin.read()
        if not text.strip():
            raise UsageError("the prompt read from stdin is empty", "pipe some text: echo 'Describe it' | qvl chat -")
        return text.strip("\n")
    if prompt is not None and not prompt.strip():
        raise UsageError("the prompt is empty", "give a question, or no prompt for an interactive chat")
    return prompt


def open_backend(request: ChatCommand) -> Backend:
    """A launched model or a server when one is meant (see remote.pick_target), else the model
    loaded in this process."""
    from qwenvl_cli.backend import remote

    in_process = request.model_path is not None or request.query.given
    target = remote.pick_target(request.endpoint, request.model_uid, request.api_key, in_process)
    if target is not None:
        return remote.open_backend(target, quiet=request.quiet)
    spec, options = resolve_for_loading(request.query, request.engine_options, request.model_path,
                                        request.force, request.quiet)
    return load_local(LocalRequest(spec, request.model_path, request.revision, request.offline,
                                   request.quiet, request.verbose, interactive=request.prompt is None), options)


def one_shot(backend: Backend, messages: list[dict[str, Any]], params: GenerationParams,
             json_output: bool = False, stats: bool = False, out: TextIO | None = None) -> Answer:
    """Stream one answer to stdout (or print one JSON object); the usage line goes to stderr."""
    out = out or sys.stdout
    answer = Answer()
    for chunk in backend.respond(messages, params):
        answer.add(chunk)
        if chunk.text and not json_output:
            out.write(chunk.text)
            out.flush()
    if json_output:
        answer.extra["model"] = backend.info
        out.write(json.dumps(answer.to_dict(), ensure_ascii=False) + "\n")
    else:
        out.write("\n")
    out.flush()
    if stats:
        render.status(stats_line(answer))
    return answer


def run(request: ChatCommand) -> int:
    """The whole `qvl chat` command; returns the exit code."""
    params = request.params.validated()
    image_opts, video_opts = media_options(request.media_flags)
    prompt = read_prompt(request.prompt)
    images = [checked_media("image", ref) for ref in request.images]
    videos = [checked_media("video", ref) for ref in request.videos]
    interactive = prompt is None
    if interactive and request.json_output:
        raise UsageError("--json needs a prompt", 'give the question: qvl chat --json "Describe it"')
    backend = open_backend(request)
    try:
        if not interactive:
            turn = msgs.user_message(prompt, images, videos)  # the checked values, not opened again
            conversation = ([msgs.text_message("system", request.system)] if request.system else []) + [turn]
            conversation = msgs.with_defaults(conversation, image_opts, video_opts)
            one_shot(backend, conversation, params, request.json_output, request.stats)
            return 0
        session = ChatSession(params=params, system=request.system, model=backend.name,
                              check_media=check_media, image_options=image_opts, video_options=video_opts,
                              images=list(request.images), videos=list(request.videos))
        tty = sys.stdin.isatty()
        return run_repl(session, backend.respond, line_reader(tty, settings.history_file() if tty else None),
                        stats=request.stats)
    finally:
        backend.close()
