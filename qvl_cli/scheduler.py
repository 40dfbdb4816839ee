"""Which request runs on the model, and when: admission, a FIFO queue, one worker thread.

The server talks to the model only through :class:`Scheduler`:

- ``admit()`` reserves a place (raises :class:`~qvl_cli.api.Busy`, HTTP 429, when
  ``max_pending`` requests are already admitted), before any media is decoded;
- ``submit(job)`` queues a prepared job; the worker runs jobs one at a time with
  ``engine.stream(..., prepared=, cancel=)`` and hands every chunk to ``job.emit``
  (from the worker thread; the server bridges it into its event loop);
- a job whose ``cancel`` event is set (client gone) is skipped if still waiting, and stops
  generating at the next token if running, so the next request is not stalled.

This is the seam for batched decoding: a batching scheduler keeps ``admit`` / ``submit`` /
``close`` and replaces ``_take`` (take up to B compatible waiting jobs) and ``_execute``
(run them together with an engine's batched ``stream``), emitting per job as here.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .api import Busy, Unavailable

DONE = object()  # emitted after the last chunk of a job


@dataclass
class Job:
    messages: list[dict[str, Any]]
    params: Any  # GenerationParams
    prepared: Any  # engine.Prepared
    emit: Callable[[Any], None]  # receives Chunk, an exception, then DONE
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)


class Admission:
    """A place in the scheduler, released exactly once (context manager)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.scheduler._release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Scheduler:
    def __init__(self, engine: Any, max_pending: int = 32) -> None:
        self.engine = engine
        self.max_pending = max(1, max_pending)
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: collections.deque[Job] = collections.deque()
        self._admitted = 0
        self._running: Job | None = None
        self._closed = False
        self.completed = 0
        self.failed = 0
        self._worker = threading.Thread(target=self._loop, name="qvl-scheduler", daemon=True)
        self._worker.start()

    # --- the server side ------------------------------------------------------------------

    def admit(self) -> Admission:
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down", "retry on another server")
            if self._admitted >= self.max_pending:
                raise Busy(f"the server is busy: {self._admitted} requests are queued or running",
                           "retry in a moment (the queue holds at most "
                           f"{self.max_pending} requests; qvl launch --max-queue raises it)")
            self._admitted += 1
        return Admission(self)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def submit(self, job: Job) -> None:
        with self._ready:
            if self._closed:
                raise Unavailable("the server is shutting down", "retry on another server")
            self._queue.append(job)
            self._ready.notify()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"admitted": self._admitted, "waiting": len(self._queue),
                    "running": int(self._running is not None), "completed": self.completed,
                    "failed": self.failed, "max_pending": self.max_pending}

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every waiting and running job and stop the worker."""
        with self._ready:
            self._closed = True
            for job in self._queue:
                job.cancel.set()
            if self._running is not None:
                self._running.cancel.set()
            self._ready.notify_all()
        self._worker.join(timeout)

    # --- the worker -------------------------------------------------------------------------

    def _take(self) -> Job | None:
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if not self._queue:
                return None
            self._running = self._queue.popleft()
            return self._running

    def _loop(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            try:
                self._execute(job)
            finally:
                with self._lock:
                    self._running = None

    def _execute(self, job: Job) -> None:
        try:
            if not job.cancel.is_set():
                for chunk in self.engine.stream(job.messages, job.params, prepared=job.prepared,
                                                cancel=job.cancel):
                    job.emit(chunk)
            self.completed += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the request that owns the job
            self.failed += 1
            job.emit(exc)
        finally:
            job.prepared = None  # free the pixel tensors now, not when the response ends
            job.emit(DONE)
