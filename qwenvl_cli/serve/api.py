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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qwenvl_cli import messages as msgs
from qwenvl_cli.errors import QvlError, UsageError
from qwenvl_cli.generation import Answer, GenerationParams, TokenLogprob, Usage

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
    allowed_origins: tuple[str, ...] = ()  # CORS: web pages on these origins may call the API

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        data = json.loads(text)
        data["aliases"] = tuple(data.get("aliases") or ())
        data["allow_media_domains"] = tuple(data.get("allow_media_domains") or ())
        data["allowed_origins"] = tuple(data.get("allowed_origins") or ())
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


def context_exceeded(limit: int, prompt: int, completion: int | None = None) -> BadRequest:
    """OpenAI's context-overflow error, word for word (litellm and the tools built on it
    match this text and the code ``context_length_exceeded`` to fire their fallbacks)."""
    if completion:
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
                   "Please reduce the length of the messages or completion.")
    else:
        message = (f"This model's maximum context length is {limit} tokens. However, your messages "
                   f"resulted in {prompt} tokens. Please reduce the length of the messages.")
    err = BadRequest(message, "shorten the conversation, lower max_tokens or the images' max_pixels",
                     param="max_tokens" if completion else "messages")
    err.code = "context_length_exceeded"
    return err


def check_budget(params: GenerationParams, prompt_tokens: int, context_length: int) -> None:
    """max_tokens larger than what fits beside the prompt is a 400, as in OpenAI and vLLM."""
    if params.max_tokens is not None and prompt_tokens + params.max_tokens > context_length:
        raise context_exceeded(context_length, prompt_tokens, params.max_tokens)


def http_error(exc: BaseException) -> HttpError:
    """Any exception -> the HttpError to answer with (usage errors are 400, the rest 500)."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, UsageError):
        if type(exc).__name__ == "PromptTooLong" and getattr(exc, "context_length", None):
            return context_exceeded(exc.context_length, exc.prompt_tokens)
        err = BadRequest(exc.message, exc.hint, param=getattr(exc, "param", None))
        err.code = "context_length_exceeded" if type(exc).__name__ == "PromptTooLong" else None
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
    prompt: str | None = None  # /v1/completions: the text as given, no chat template


def check_model(name: Any, config: ServerConfig) -> str:
    if name is None:
        return config.uid
    if not isinstance(name, str):
        raise BadRequest("'model' must be a string", f"send \"model\": \"{config.uid}\"", param="model")
    if name not in (config.uid, *config.aliases):
        raise ModelNotFound(f"the model {name!r} does not exist on this server",
                            f"this server serves {config.uid!r} (GET /v1/models)", param="model")
    return config.uid


def _params(chat: Any) -> GenerationParams:
    """The checked body's sampling fields as GenerationParams (vLLM's readings: seed -1 is
    no seed, top_k -1 is no top-k)."""
    max_tokens = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
    stop = (chat.stop,) if isinstance(chat.stop, str) else tuple(chat.stop or ())
    params = GenerationParams(
        max_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p,
        top_k=0 if chat.top_k == -1 else chat.top_k, repetition_penalty=chat.repetition_penalty,
        seed=None if chat.seed == -1 else chat.seed, stop=stop, ignore_eos=bool(chat.ignore_eos),
        min_p=chat.min_p or None, presence_penalty=chat.presence_penalty or None,
        frequency_penalty=chat.frequency_penalty or None,
        logit_bias=tuple(sorted((int(k), float(v)) for k, v in (chat.logit_bias or {}).items())),
        n=chat.n or 1, logprobs=bool(chat.logprobs), top_logprobs=chat.top_logprobs or 0,
        grammar=_grammar(chat.response_format))
    try:
        return params.validated()
    except UsageError as exc:
        raise BadRequest(exc.message, exc.hint) from None


def _grammar(fmt: Any) -> tuple[str, str] | None:
    """response_format -> the grammar the engine constrains the answer with (None: text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ("json_object", "")
    return ("json_schema", json.dumps(fmt.json_schema.schema_, sort_keys=True))


def parse_chat(body: Any, config: ServerConfig) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or an HttpError (400 / 404)."""
    from qwenvl_cli.serve import schema

    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object", "send {\"model\": ..., \"messages\": [...]}")
    model = check_model(body.get("model"), config)
    try:
        chat = schema.check_chat(body)
        messages = msgs.from_openai(chat.messages, require_user=False)
        schema.check_part_values(messages, config.max_image_pixels)
    except UsageError as exc:
        raise BadRequest(exc.message, exc.hint, param=getattr(exc, "param", "messages")) from None
    mm = chat.mm_processor_kwargs
    pixels = {"min_pixels": chat.min_pixels or (mm and mm.min_pixels) or config.min_pixels,
              "max_pixels": chat.max_pixels or (mm and mm.max_pixels) or config.max_pixels}
    video = {**pixels, "fps": chat.fps or (mm and mm.fps) or None, "max_frames": chat.max_frames}
    messages = msgs.with_defaults(messages, image=pixels, video=video)
    options = chat.stream_options
    return ChatRequest(model, messages, _params(chat), bool(chat.stream),
                       bool(options and options.include_usage))


def decode_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", "send a JSON object") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply", "send a JSON object a few levels deep") from None
    try:  # a lone UTF-16 surrogate (\\ud800) is valid JSON but no text the tokenizer can read
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise BadRequest("the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff escape)",
                         "send well-formed Unicode text") from None
    except (RecursionError, ValueError):
        raise BadRequest("the request body is nested too deeply", "send a JSON object a few levels deep") from None
    return body


# --- responses --------------------------------------------------------------------------------


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def logprobs_body(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's ``choices[].logprobs``: each token with its log-probability and alternatives."""
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, v) for a, v in t.top]}
                        for t in items], "refusal": None}


def total_usage(answers: Sequence[Answer]) -> Usage:
    """One prompt, n completions: the prompt counted once, the completions summed."""
    usages = [a.usage for a in answers if a.usage is not None]
    if not usages:
        return Usage(0, 0)
    return Usage(usages[0].prompt_tokens, sum(u.completion_tokens for u in usages))


def completion(req_id: str, model: str, answers: Sequence[Answer], created: int | None = None,
               logprobs: bool = False) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": a.text},
                "logprobs": logprobs_body(a.logprobs) if logprobs else None,
                "finish_reason": _finish(a.finish_reason)} for i, a in enumerate(answers)]
    body = {"id": req_id, "object": "chat.completion", "created": created or int(time.time()),
            "model": model, "choices": choices, "usage": total_usage(answers).to_dict()}
    if answers and answers[0].timings:
        body["timings"] = answers[0].timings.to_dict()
    return body


def chunk(req_id: str, model: str, created: int, delta: dict[str, Any] | None = None,
          finish_reason: str | None = None, usage: Usage | None = None,
          include_usage: bool = False, index: int = 0, logprobs: Sequence[TokenLogprob] | None = None,
          ) -> dict[str, Any]:
    """One streamed chunk. With ``usage`` it is the usage-only last chunk (no choices)."""
    body: dict[str, Any] = {"id": req_id, "object": "chat.completion.chunk", "created": created,
                            "model": model}
    if usage is not None:
        body.update(choices=[], usage=usage.to_dict())
        return body
    body["choices"] = [{"index": index, "delta": delta or {},
                        "logprobs": logprobs_body(logprobs) if logprobs else None,
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
