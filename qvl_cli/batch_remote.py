"""`qvl batch --endpoint URL`: send each request to an OpenAI-compatible server.

Uses the official ``openai`` client from a few daemon threads (``--batch-size`` requests in
flight; the server batches them if it can). Local image files are sent inline as data
URIs, since the server cannot read this machine's disk. A request the server refuses
(4xx) or fails (5xx after the client's retries) becomes that request's error record; a
server that cannot be reached at all stops the run (every request would fail alike).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from . import messages as msgs
from . import render, settings
from .batch_io import Request, error_text, record
from .errors import ServerError, one_line
from .generation import GenerationParams

Emit = Callable[[dict[str, Any]], None]
TIMEOUT = 600.0  # seconds for one answer: long videos and long answers take a while


def base_url(endpoint: str) -> str:
    """'http://host:8000' or '.../v1' or '.../v1/' -> 'http://host:8000/v1'."""
    url = endpoint.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


def request_kwargs(params: GenerationParams) -> dict[str, Any]:
    """The chat.completions arguments for ``params`` (top_k and repetition_penalty go in the
    body as extra fields, as vLLM and qvl's server read them)."""
    kwargs: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        value = getattr(params, name)
        if value is not None:
            kwargs[name] = value
    if params.stop:
        kwargs["stop"] = list(params.stop)
    extra = {k: getattr(params, k) for k in ("top_k", "repetition_penalty") if getattr(params, k) is not None}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def connect(endpoint: str, model: str | None) -> tuple[Any, str]:
    """An OpenAI client for the server and the model id to ask for (the first it lists
    unless --model-name names one); ServerError when the server cannot be reached."""
    import openai

    client = openai.OpenAI(base_url=base_url(endpoint), api_key=settings.api_key() or _env_key() or "none",
                           timeout=TIMEOUT, max_retries=2)
    try:
        listed = [m.id for m in client.models.list()]
    except openai.APIConnectionError as exc:
        raise ServerError(f"cannot reach {base_url(endpoint)}: {one_line(exc)}",
                          "check the URL and that the server is running (`qvl list`)") from None
    except openai.APIStatusError as exc:
        raise ServerError(f"{base_url(endpoint)}/models answered {exc.status_code}: {one_line(exc.message)}",
                          "check the URL, and QVL_API_KEY if the server wants a key") from None
    if model is None:
        if not listed:
            raise ServerError(f"{base_url(endpoint)} serves no model", "launch one first")
        model = listed[0]
    return client, model


def _env_key() -> str | None:
    import os

    return os.environ.get("OPENAI_API_KEY") or None


def ask(client: Any, model: str, request: Request) -> dict[str, Any]:
    """One request -> its output record (an error record for anything the server refuses)."""
    import openai

    try:
        body = msgs.to_openai(request.messages)
    except OSError as exc:
        return record(request.id, error=f"cannot read a media file: {exc}")
    try:
        reply = client.chat.completions.create(model=model, messages=body, **request_kwargs(request.params))
    except openai.APIConnectionError:
        raise
    except openai.APIStatusError as exc:
        return record(request.id, error=f"the server answered {exc.status_code}: {one_line(_message(exc))}")
    except openai.OpenAIError as exc:
        return record(request.id, error=error_text(exc))
    choice = reply.choices[0]
    usage = reply.usage
    return record(request.id, choice.message.content or "",
                  {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                   "total_tokens": usage.total_tokens} if usage else None, choice.finish_reason)


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(body.get("detail"), str):
            return body["detail"]
    return str(getattr(exc, "message", exc))


def run(endpoint: str, model: str | None, requests: Sequence[Request], concurrency: int, emit: Emit,
        quiet: bool = False) -> None:
    """Answer ``requests`` through the server, ``concurrency`` at a time, emitting records
    as they come back (not in input order)."""
    client, model = connect(endpoint, model)
    if not quiet:
        render.status(f"sending {len(requests)} requests to {base_url(endpoint)} (model {model}), "
                      f"{concurrency} at a time")
    work: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    for request in requests:
        work.put(request)
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                request = work.get_nowait()
            except queue.Empty:
                return
            try:
                results.put(ask(client, model, request))
            except BaseException as exc:  # noqa: BLE001 - handed to the writing thread
                results.put(exc)
                return

    threads = [threading.Thread(target=worker, daemon=True, name=f"qvl-batch-remote-{i}")
               for i in range(max(1, min(concurrency, len(requests))))]
    for thread in threads:
        thread.start()
    try:
        for _ in requests:
            item = results.get()
            if isinstance(item, BaseException):
                raise ServerError(f"lost the connection to {base_url(endpoint)}: {one_line(item)}",
                                  "check the server, then rerun the same command to resume") from None
            emit(item)
    finally:
        stop.set()  # threads still waiting on the server are daemons: an interrupted run exits now
