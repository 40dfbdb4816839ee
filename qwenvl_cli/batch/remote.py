"""`qvl batch` against a server: `--endpoint URL` (any OpenAI-compatible server) or a model
started with `qvl launch` (`--model-uid`, or the only one running).

Each request goes through :class:`qwenvl_cli.backend.remote.Remote` (the official ``openai`` client,
the same wire format as `qvl chat --endpoint`: local media inline as data URIs), from a
few daemon threads: ``--batch-size`` requests in flight, which the server batches if it
can. A request the server refuses (4xx) or fails (5xx) becomes that request's error
record; a server that cannot be reached stops the run (every request would fail alike),
after one retry of the request that found it gone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from qwenvl_cli import render
from qwenvl_cli.batch.files import Request, error_text, record
from qwenvl_cli.errors import QvlError, ServerError
from qwenvl_cli.generation import collect

Emit = Callable[[dict[str, Any]], None]
RETRY_AFTER = 1.0  # seconds before retrying a request whose connection failed


def _connection_lost(exc: BaseException) -> bool:
    """The server is gone (refused, reset), as opposed to slow (a timeout) or refusing this
    request. remote.py raises translated errors ``from None``; the original is the context."""
    names = {c.__name__ for c in type(exc.__context__ or exc).__mro__}
    return "APIConnectionError" in names and "APITimeoutError" not in names


def ask(remote: Any, request: Request) -> dict[str, Any]:
    """One request -> its output record; raises ServerError when the server is gone."""
    for attempt in (1, 2):
        try:
            answer = collect(remote(request.messages, request.params))
        except QvlError as exc:
            if not _connection_lost(exc):
                return record(request.id, error=error_text(exc))
            if attempt == 2:
                raise
            time.sleep(RETRY_AFTER)
            continue
        return record(request.id, answer.text, answer.usage.to_dict() if answer.usage else None,
                      answer.finish_reason)
    raise AssertionError("unreachable")  # pragma: no cover


def run(target: Any, requests: Sequence[Request], concurrency: int, emit: Emit, quiet: bool = False) -> None:
    """Answer ``requests`` through the server, ``concurrency`` at a time, emitting records as
    they come back (not in input order)."""
    from qwenvl_cli.backend.remote import Remote

    remote = Remote(target)
    model = remote.check()  # unreachable server, wrong key, unknown model: fail before any request
    if not quiet:
        render.status(f"sending {len(requests)} requests to {model} at {target.base_url}, {concurrency} at a time")
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
                results.put(ask(remote, request))
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
                if isinstance(item, QvlError):
                    raise ServerError(f"lost the server: {item.message}",
                                      "check the server, then rerun the same command to resume") from None
                raise item
            emit(item)
    finally:
        stop.set()  # threads still waiting on the server are daemons: an interrupted run exits now
