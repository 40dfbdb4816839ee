"""`qvl chat` against a launched model or any OpenAI-compatible server.

``pick_target(...)`` decides where chat goes: ``--endpoint URL`` (any server), ``--model-uid
UID`` (a model `qvl launch` started), or, with no spec flags and exactly one launched model
running, that one; None means "load the model in this process". ``Remote(target)`` is a
``respond(messages, params) -> Iterator[Chunk]`` callable over the official ``openai``
client (streaming): the same records the in-process engine yields, so the one-shot printer
and the REPL do not care where the model runs. Local media are sent as data URIs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qwenvl_cli import messages as msgs
from qwenvl_cli import settings
from qwenvl_cli.errors import QvlError, ServerError, UsageError, did_you_mean, one_line
from qwenvl_cli.generation import Chunk, GenerationParams, Timings, Usage
from qwenvl_cli.serve import registry

DEFAULT_TIMEOUT = 600.0  # seconds to wait for a whole answer's next bytes


@dataclass(frozen=True)
class Target:
    base_url: str  # ends with /v1 for qvl servers
    model: str | None  # None: the first model the server lists
    api_key: str | None = None
    uid: str | None = None  # set when it is a model launched by qvl

    def describe(self) -> str:
        name = self.model or "the server's model"
        return f"{name} at {self.base_url}"


def normalise_endpoint(url: str) -> str:
    """'host:8000' / 'http://host:8000' / 'http://host:8000/v1/' -> 'http://host:8000/v1'."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--endpoint {url!r} is not an http(s) URL", "write it like http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or '/v1'}"


def _from_entry(entry: registry.Entry, api_key: str | None) -> Target:
    if entry.state != registry.RUNNING:
        raise ServerError(f"the model {entry.uid!r} is still starting", "wait for `qvl launch` to finish, then retry")
    if entry.api_key and not api_key:
        raise ServerError(f"the model {entry.uid!r} was launched with an API key",
                          "pass --api-key KEY or set QVL_API_KEY")
    return Target(entry.endpoint, entry.uid, api_key, entry.uid)


def pick_target(endpoint: str | None = None, model_uid: str | None = None, api_key: str | None = None,
                spec_given: bool = False) -> Target | None:
    """Where `qvl chat` sends its requests; None: load the model in-process.

    ``--endpoint`` wins (``--model-uid`` then names the model on that server); ``--model-uid``
    alone picks a launched model; spec flags mean "in-process"; otherwise exactly one running
    launched model is used, and several are a usage error.
    """
    key = api_key or settings.api_key()
    if endpoint:
        return Target(normalise_endpoint(endpoint), model_uid, key)
    if model_uid:
        return _from_entry(registry.find(model_uid), key)
    if spec_given:
        return None
    running = [e for e in registry.entries() if e.state == registry.RUNNING]
    if len(running) > 1:
        uids = ", ".join(e.uid for e in running)
        raise UsageError(f"{len(running)} launched models are running ({uids})",
                         "pick one with --model-uid UID, or give spec flags to load a model in this process")
    return _from_entry(running[0], key) if running else None


# --- talking to it ----------------------------------------------------------------------------


def _plain(ref: Any) -> Any:
    """Media references as to_openai takes them (paths / URLs), from checked source objects too."""
    if isinstance(ref, (str, list)):
        return [_plain(r) for r in ref] if isinstance(ref, list) else ref
    if isinstance(ref, Path):
        return str(ref)
    path, data = getattr(ref, "path", None), getattr(ref, "data", None)
    if path is not None:
        return str(path)
    if data is not None:
        import base64

        fmt = (getattr(ref, "format", None) or "png").lower()
        return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"
    frames = getattr(ref, "frames", None)
    if frames:
        return [_plain(f) for f in frames]
    return getattr(ref, "source", str(ref))


def _plain_part(part: dict[str, Any]) -> dict[str, Any]:
    for key in ("image", "video"):
        if key in part:
            part = {**part, key: _plain(part[key])}
    return part


def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Qwen-format messages (string contents allowed) -> OpenAI messages, local files inlined."""
    plain = [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
              else [_plain_part(p) for p in m["content"]]} for m in messages]
    try:
        return msgs.to_openai(plain)
    except OSError as exc:
        raise UsageError(f"cannot read {getattr(exc, 'filename', '') or 'a media file'}: {exc.strerror}",
                         "check the path") from None


def request_options(params: GenerationParams) -> dict[str, Any]:
    """GenerationParams -> chat.completions.create keyword arguments (vLLM names for extras)."""
    params = params.validated()
    out: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        value = getattr(params, name)
        if value is not None:
            out[name] = value
    if params.stop:
        out["stop"] = list(params.stop)
    extra = {k: getattr(params, k) for k in ("top_k", "repetition_penalty") if getattr(params, k) is not None}
    if params.ignore_eos:
        extra["ignore_eos"] = True
    if extra:
        out["extra_body"] = extra
    return out


def translate_api_error(exc: BaseException, target: Target) -> QvlError | None:
    """openai exceptions -> QvlError (by class name: no import of openai here)."""
    names = {c.__name__ for c in type(exc).__mro__}
    body = getattr(exc, "body", None)
    hint = body.get("hint") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) and body.get("message") else getattr(exc, "message", str(exc))
    if names & {"APIConnectionError", "APITimeoutError"}:
        return ServerError(f"cannot reach {target.base_url}: {one_line(exc, 120)}",
                           "is the server running? `qvl list` shows launched models; `qvl launch` starts one")
    status = getattr(exc, "status_code", None)
    if status == 401:
        return ServerError(f"{target.base_url} refused the request: {one_line(message)}",
                           "pass the server's key with --api-key KEY or set QVL_API_KEY")
    if status in (400, 404, 413, 422):
        return UsageError(one_line(message), hint or "check the request")
    if status is not None:
        return ServerError(f"{target.base_url} answered {status}: {one_line(message)}", hint or "retry later")
    if "APIError" in names:
        return ServerError(f"{target.base_url}: {one_line(message)}", hint or "see the server's log")
    return None


class Remote:
    """``respond(messages, params) -> Iterator[Chunk]`` over the OpenAI chat API (streaming)."""

    def __init__(self, target: Target, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.target = target
        self.timeout = timeout
        self._client: Any = None
        self._model = target.model

    @property
    def client(self) -> Any:
        if self._client is None:
            import httpx
            from openai import OpenAI

            self._client = OpenAI(base_url=self.target.base_url, api_key=self.target.api_key or "EMPTY",
                                  max_retries=0, timeout=httpx.Timeout(self.timeout, connect=10.0))
        return self._client

    def listed(self) -> list[str]:
        """GET /models: the names the server serves (translated errors when it cannot say)."""
        try:
            return [m.id for m in self.client.models.list()]
        except Exception as exc:  # noqa: BLE001 - translated; unknown errors go up unchanged
            raise translate_api_error(exc, self.target) or exc from None

    @property
    def model(self) -> str:
        """The model name to send; asks the server (GET /models) when it was not given."""
        if self._model is None:
            listed = self.listed()
            if not listed:
                raise ServerError(f"{self.target.base_url} serves no model", "check the server")
            self._model = listed[0]
        return self._model

    def check(self) -> str:
        """Reach the server now (key, model name): fail before the first question, not after."""
        listed = self.listed()
        if self._model is not None and listed and self._model not in listed:
            raise UsageError(f"{self.target.base_url} has no model {self._model!r}"
                             f"{did_you_mean(self._model, listed)}", f"it serves: {', '.join(listed)}")
        return self.model

    def __call__(self, messages: list[dict[str, Any]], params: GenerationParams = GenerationParams()
                 ) -> Iterator[Chunk]:
        started = time.perf_counter()
        options = request_options(params)
        wire = wire_messages(messages)
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=wire, stream=True, stream_options={"include_usage": True}, **options)
        except Exception as exc:  # noqa: BLE001 - translated; unknown errors go up unchanged
            raise translate_api_error(exc, self.target) or exc from None
        yield from self._chunks(stream, started)

    def _chunks(self, stream: Any, started: float) -> Iterator[Chunk]:
        finish, usage, first_at, count = None, None, None, 0
        try:
            for event in stream:
                if event.usage is not None:
                    usage = Usage(event.usage.prompt_tokens, event.usage.completion_tokens)
                for choice in event.choices or ():
                    text = choice.delta.content if choice.delta else None
                    if text:
                        first_at = first_at or time.perf_counter()
                        count += 1
                        yield Chunk(text=text)
                    finish = choice.finish_reason or finish
        except Exception as exc:  # noqa: BLE001 - translated; unknown errors go up unchanged
            raise translate_api_error(exc, self.target) or exc from None
        finally:
            stream.close()  # a consumer that stops early closes the connection: the server cancels
        end = time.perf_counter()
        first_at = first_at or end
        tokens = usage.completion_tokens if usage else count
        tps = (tokens - 1) / (end - first_at) if tokens > 1 and end > first_at else 0.0
        yield Chunk(finish_reason=finish or "stop", usage=usage,
                    timings=Timings(first_at - started, end - started, tps))


def respond_for(target: Target) -> Remote:
    return Remote(target)


def open_backend(target: Target, quiet: bool = False) -> Any:
    """A chat Backend (see backend.local) that talks to ``target``; asks for the model name now, so
    an unreachable server or a wrong key fails before the first question."""
    from qwenvl_cli import render
    from qwenvl_cli.backend.local import Backend

    remote = Remote(target)
    model = remote.check()
    if not quiet:
        render.status(f"talking to {model} at {target.base_url}")
    return Backend(model, remote, {"model": model, "endpoint": target.base_url, "device": "remote"})
