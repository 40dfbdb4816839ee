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

from . import messages as msgs
from . import render, settings
from .backends import Backend, LocalRequest, load_local
from .chat import ChatSession, line_reader, run_repl
from .errors import UsageError
from .generation import Answer, GenerationParams, stats_line


@dataclass(frozen=True)
class ChatRequest:
    prompt: str | None = None
    spec_flags: dict[str, Any] = field(default_factory=dict)  # model_name, size_in_billions, ...
    model_path: str | None = None
    revision: str | None = None
    offline: bool = False
    force: bool = False
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    media_flags: dict[str, Any] = field(default_factory=dict)  # min_pixels, max_pixels, fps, ...
    system: str | None = None
    params: GenerationParams = GenerationParams()
    engine_options: Any = None
    json_output: bool = False
    stats: bool = False
    verbose: bool = False
    quiet: bool = False
    endpoint: str | None = None  # --endpoint URL: any OpenAI-compatible server
    model_uid: str | None = None  # --model-uid UID: a model `qvl launch` started
    api_key: str | None = None


def image_video_options(flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The media flags the user set, as per-part options (--min/--max-pixels cover both)."""
    from . import vision

    vision.check_flags(flags.get("min_pixels"), flags.get("max_pixels"), flags.get("fps"),
                       flags.get("max_frames"), flags.get("video_start"), flags.get("video_end"))
    image = {k: flags[k] for k in ("min_pixels", "max_pixels") if flags.get(k) is not None}
    video = {k: v for k, v in flags.items() if v is not None}
    return image, video


def check_media(kind: str, ref: str) -> str:
    """Probe an image or video reference now (exists, readable, within limits)."""
    from . import media

    (media.resolve_image if kind == "image" else media.resolve_video)(ref)
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


def resolve_for_loading(spec_flags: dict[str, Any], engine_options: Any, model_path: str | None,
                        force: bool, quiet: bool = False) -> tuple[Any, Any]:
    """Check the spec before anything is downloaded (backends.check_spec), then place the
    model on the GPUs the fit check chose when the user named none.

    Returns (spec or None, engine options)."""
    from dataclasses import replace

    from .backends import check_spec

    gpu_idx = ",".join(map(str, engine_options.gpu_idx)) if engine_options.gpu_idx else None
    result = check_spec(spec_flags, gpu_idx=gpu_idx, device=engine_options.device, model_path=model_path,
                        force=force, quiet=quiet)
    if result is None:
        return None, engine_options
    options = replace(engine_options, model_format=result.spec.model_format)
    if result.placement and not (options.gpu_idx or options.n_gpu) and options.device != "cpu":
        options = replace(options, gpu_idx=tuple(g.index for g in result.placement.gpus))
    return result.spec, options


def open_backend(request: ChatRequest) -> Backend:
    """A launched model or a server when one is meant (see remote.pick_target), else the model
    loaded in this process."""
    from . import remote

    in_process = request.model_path is not None or any(v is not None for v in request.spec_flags.values())
    target = remote.pick_target(request.endpoint, request.model_uid, request.api_key, in_process)
    if target is not None:
        return remote.open_backend(target, quiet=request.quiet)
    spec, options = resolve_for_loading(request.spec_flags, request.engine_options, request.model_path,
                                        request.force, request.quiet)
    return load_local(LocalRequest(spec, request.model_path, request.revision, request.offline,
                                   request.quiet, request.verbose), options)


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


def run(request: ChatRequest) -> int:
    """The whole `qvl chat` command; returns the exit code."""
    params = request.params.validated()
    image_opts, video_opts = image_video_options(request.media_flags)
    prompt = read_prompt(request.prompt)
    for ref in request.images:
        check_media("image", ref)
    for ref in request.videos:
        check_media("video", ref)
    interactive = prompt is None
    if interactive and request.json_output:
        raise UsageError("--json needs a prompt", 'give the question: qvl chat --json "Describe it"')
    backend = open_backend(request)
    try:
        if not interactive:
            turn = msgs.user_message(prompt, request.images, request.videos)
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
