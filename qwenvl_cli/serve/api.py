"""The OpenAI chat API as plain data: request bodies in, response bodies out. No web framework.

``parse_chat(body, config)`` validates a ``/v1/chat/completions`` body and returns a
:class:`ChatRequest` (Qwen-format messages + GenerationParams), raising an :class:`HttpError`
with the OpenAI status and error type. ``completion``, ``chunk`` and ``error_body`` build the
JSON the OpenAI clients expect. :mod:`qwenvl_cli.serve.server` wires them to HTTP.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from qwenvl_cli import messages as msgs
from qwenvl_cli.errors import QvlError, UsageError
from qwenvl_cli.generation import Answer, GenerationParams, Usage

DEFAULT_MAX_QUEUE = 32
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_MEDIA_TIMEOUT = 15.0
DEFAULT_SHUTDOWN_GRACE = 5.0


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server process needs, JSON-serialisable (the API key travels apart)."""

    uid: str
    model_path: str
    aliases: tuple[str, ...] = ()  # other model names accepted, e.g. the hub repo id
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, chosen when binding
    engine: dict[str, Any] = field(default_factory=dict)  # EngineOptions fields
    context_length: int | None = None
    spec: dict[str, Any] | None = None
    allow_local_media: str | None = None  # a folder; None: no local files at all
    allow_remote_media: bool = False
    max_queue: int = DEFAULT_MAX_QUEUE  # requests admitted at once (running + waiting)
    max_batch: int = 1  # waiting requests decoded together (same sampling parameters)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    media_timeout: float = DEFAULT_MEDIA_TIMEOUT
    allow_media_domains: tuple[str, ...] = ()  # hosts remote media may resolve to private addresses
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE  # seconds a shutdown waits for answers to finish
    min_pixels: int | None = None  # defaults for image / frame parts that set none
    max_pixels: int | None = None
    log_file: str | None = None
    foreground: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        data = json.loads(text)
        data["aliases"] = tuple(data.get("aliases") or ())
        data["allow_media_domains"] = tuple(data.get("allow_media_domains") or ())
        return cls(**data)


# --- errors with an HTTP status -------------------------------------------------------------


class HttpError(QvlError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, hint: str | None = None, param: str | None = None) -> None:
        super().__init__(message, hint)
        self.param = param


class BadRequest(HttpError):
    pass


class Unauthorized(HttpError):
    status, code = 401, "invalid_api_key"


class ModelNotFound(HttpError):
    status, type, code = 404, "not_found_error", "model_not_found"


class TooLarge(HttpError):
    status, code = 413, "request_too_large"


class Busy(HttpError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class Unavailable(HttpError):
    status, type, code = 503, "service_unavailable", "unavailable"


def http_error(exc: BaseException) -> HttpError:
    """Any exception -> the HttpError to answer with (usage errors are 400, the rest 500)."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, UsageError):
        code = "context_length_exceeded" if type(exc).__name__ == "PromptTooLong" else None
        err = BadRequest(exc.message, exc.hint)
        err.code = code
        return err
    if type(exc).__name__ == "OutOfMemory":  # this request was too much now; the model still serves
        return Unavailable(exc.message, exc.hint)
    err = HttpError(exc.message if isinstance(exc, QvlError) else f"{type(exc).__name__}: {exc}",
                    exc.hint if isinstance(exc, QvlError) else "see the server log")
    err.status, err.type = 500, "server_error"
    return err


def error_body(err: HttpError) -> dict[str, Any]:
    """The OpenAI error shape, plus qvl's hint (clients ignore unknown keys)."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param,
                      "code": err.code, "hint": err.hint}}


# --- requests ---------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    params: GenerationParams
    stream: bool = False
    include_usage: bool = False


_UNSUPPORTED = {
    "tools": "tool calling is not supported", "functions": "function calling is not supported",
    "tool_choice": "tool calling is not supported", "function_call": "function calling is not supported",
    "logprobs": "logprobs are not supported", "top_logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported", "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}


def _number(body: Mapping[str, Any], name: str, kind: type = float) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        wanted = "an integer" if kind is int else "a number"
        raise BadRequest(f"'{name}' must be {wanted}, not {value!r}", f"fix '{name}'", param=name)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false, not {value!r}", f"fix '{name}'", param=name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise BadRequest("'stop' must be a string or a list of strings", "fix 'stop'", param="stop")


def check_model(name: Any, config: ServerConfig) -> str:
    if name is None:
        return config.uid
    if not isinstance(name, str):
        raise BadRequest("'model' must be a string", f"send \"model\": \"{config.uid}\"", param="model")
    if name not in (config.uid, *config.aliases):
        raise ModelNotFound(f"the model {name!r} does not exist on this server",
                            f"this server serves {config.uid!r} (GET /v1/models)", param="model")
    return config.uid


def _params(body: Mapping[str, Any]) -> GenerationParams:
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name) not in (None, 0):
            raise BadRequest(f"'{name}' is not supported", "use 'repetition_penalty' instead", param=name)
    params = GenerationParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature"), top_p=_number(body, "top_p"),
        top_k=_number(body, "top_k", int), repetition_penalty=_number(body, "repetition_penalty"),
        seed=_number(body, "seed", int), stop=_stop(body.get("stop")),
        ignore_eos=_flag(body, "ignore_eos"))
    try:
        return params.validated()
    except UsageError as exc:
        raise BadRequest(exc.message, exc.hint) from None


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, why in _UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}):
            raise BadRequest(f"'{name}': {why} by this server", f"leave '{name}' out", param=name)
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest(f"'n' must be 1, not {n!r}: one answer per request",
                         "send several requests for several answers", param="n")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, Mapping) or fmt.get("type") != "text"):
        raise BadRequest("'response_format' other than text is not supported",
                         "leave 'response_format' out", param="response_format")


def parse_chat(body: Any, config: ServerConfig) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or an HttpError (400 / 404)."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object", "send {\"model\": ..., \"messages\": [...]}")
    model = check_model(body.get("model"), config)
    _refuse_unsupported(body)
    try:
        messages = msgs.from_openai(body.get("messages"))
    except UsageError as exc:
        raise BadRequest(exc.message, exc.hint, param="messages") from None
    pixels = {k: _number(body, k, int) for k in ("min_pixels", "max_pixels")}
    pixels = {"min_pixels": pixels["min_pixels"] or config.min_pixels,
              "max_pixels": pixels["max_pixels"] or config.max_pixels}
    video = {**pixels, "fps": _number(body, "fps"), "max_frames": _number(body, "max_frames", int)}
    messages = msgs.with_defaults(messages, image=pixels, video=video)
    stream = _flag(body, "stream") if body.get("stream") is not None else False
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise BadRequest("'stream_options' must be an object", "fix 'stream_options'", param="stream_options")
    return ChatRequest(model, messages, _params(body), stream, bool(options.get("include_usage")))


def decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", "send a JSON object") from None


# --- responses --------------------------------------------------------------------------------


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def completion(req_id: str, model: str, answer: Answer, created: int | None = None) -> dict[str, Any]:
    usage = answer.usage or Usage(0, 0)
    body = {"id": req_id, "object": "chat.completion", "created": created or int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "logprobs": None, "finish_reason": _finish(answer.finish_reason)}],
            "usage": usage.to_dict()}
    if answer.timings:
        body["timings"] = answer.timings.to_dict()
    return body


def chunk(req_id: str, model: str, created: int, delta: dict[str, Any] | None = None,
          finish_reason: str | None = None, usage: Usage | None = None,
          include_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk. With ``usage`` it is the usage-only last chunk (no choices)."""
    body: dict[str, Any] = {"id": req_id, "object": "chat.completion.chunk", "created": created,
                            "model": model}
    if usage is not None:
        body.update(choices=[], usage=usage.to_dict())
        return body
    body["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None,
                        "finish_reason": _finish(finish_reason) if finish_reason else None}]
    if include_usage:
        body["usage"] = None  # as OpenAI: null on every chunk but the last
    return body


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def models_list(config: ServerConfig, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": config.uid, "object": "model", "created": created,
                                        "owned_by": "qvl", "root": config.model_path}]}
