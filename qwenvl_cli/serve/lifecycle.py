"""The server's life around the requests: readiness, the scheduler's supervisor, shutdown with
a grace period, cut answers, and the refusals the HTTP library makes before the app runs.

What is guaranteed (docs/server.md says the same):

- ``GET /health`` and ``GET /v1/models`` answer 503 until the model is loaded and warmed up,
  and 503 again once the server is stopping or its scheduler has failed;
- a shutdown (SIGTERM / SIGINT, ``qvl terminate``) refuses new requests at once, waits up to
  ``--shutdown-grace`` seconds for the admitted ones, then answers what still waits with 503
  and ``Retry-After``, and ends a stream in flight with an error event and no ``[DONE]``;
- whatever ends the scheduler's loop fails the waiting requests with 503, turns ``/health``
  to 503 and makes the process exit non-zero, so a process manager restarts it;
- a request the HTTP parser refuses (a malformed ``Content-Length``, a broken request line)
  gets an OpenAI-shaped JSON 400, not the library's plain text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from qwenvl_cli.generation import Answer
from qwenvl_cli.serve.scheduler import DONE, QueuedRequest, Scheduler

def cut_line(kind: str, reason: str, answer: Answer) -> str:
    """The log line of an answer that did not finish: what happened, after how much."""
    usage = answer.usage
    done = f"{usage.completion_tokens} tokens" if usage else f"{len(answer.text)} characters"
    return f"chat {kind}: cut ({reason}) after {done}; not reported as complete"


class Ticket:
    """Chunks of one job, handed from the scheduler's thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, admission: Any, scheduler: Scheduler) -> None:
        self.loop = loop
        self.admission = admission
        self.scheduler = scheduler
        self.queue: asyncio.Queue = asyncio.Queue()

    def abandon(self, job: QueuedRequest) -> None:
        """The client went away: drop its job (out of the queue now, or stopped at the next
        token) and give its place to the next request at once."""
        self.scheduler.discard(job)
        self.admission.release()

    def emit(self, item: Any) -> None:
        if item is DONE:
            self.admission.release()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped
            pass

    async def items(self) -> AsyncIterator[Any]:
        while True:
            item = await self.queue.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


async def watch_disconnect(request: Any, ticket: Ticket, job: QueuedRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ticket.abandon(job)
            return
