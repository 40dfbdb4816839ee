"""Which request runs on the model, and when: admission, a FIFO queue, one worker thread.

The server talks to the model only through :class:`Scheduler`:

- ``admit()`` reserves a place (raises :class:`~qwenvl_cli.serve.api.Busy`, HTTP 429, when
  ``max_pending`` requests are already admitted), before any media is decoded;
- ``submit(job)`` queues a prepared job; the worker runs jobs one at a time with
  ``engine.stream(..., prepared=, cancel=)`` and hands every chunk to ``job.emit``
  (from the worker thread; the server bridges it into its event loop);
- a job whose ``cancel`` event is set (client gone) is skipped if still waiting, and stops
  generating at the next token if running, so the next request is not stalled.

Batched decoding lives behind two methods: ``_take`` takes the oldest waiting job plus up to
``max_batch - 1`` later ones with the same sampling parameters (``params.batch_key()``), and
``_execute`` runs a single job with ``engine.stream`` or a batch with ``engine.run_jobs``
(left-padded, each job ending on its own). ``max_batch`` 1 (the default) is one request at a
time. When the engine decodes with qvl's static-cache loop (a GPU; see qwenvl_cli.engine.fastpath) and
``max_batch`` is above 1, :meth:`_loop_continuous` replaces both: requests join the running
batch between two decode steps and leave it when done (``Engine.run_continuous``).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwenvl_cli.serve.api import Busy, Unavailable

DONE = object()  # emitted after the last chunk of a job


@dataclass
class QueuedRequest:
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
    def __init__(self, engine: Any, max_pending: int = 32, max_batch: int = 1) -> None:
        self.engine = engine
        self.max_pending = max(1, max_pending)
        self.max_batch = max(1, max_batch)
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: collections.deque[QueuedRequest] = collections.deque()
        self._admitted = 0
        self._running: list[QueuedRequest] = []
        self._closed = False
        self.completed = 0
        self.failed = 0
        self.largest_batch = 0
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

    def submit(self, job: QueuedRequest) -> None:
        with self._ready:
            if self._closed:
                raise Unavailable("the server is shutting down", "retry on another server")
            self._queue.append(job)
            self._ready.notify()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"admitted": self._admitted, "waiting": len(self._queue),
                    "running": len(self._running), "completed": self.completed,
                    "failed": self.failed, "max_pending": self.max_pending,
                    "max_batch": self.max_batch, "largest_batch": self.largest_batch}

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every waiting and running job and stop the worker."""
        with self._ready:
            self._closed = True
            for job in self._queue:
                job.cancel.set()
            for job in self._running:
                job.cancel.set()
            self._ready.notify_all()
        self._worker.join(timeout)

    # --- the worker -------------------------------------------------------------------------

    def _take(self) -> list[QueuedRequest]:
        """The oldest waiting job, and up to max_batch - 1 later ones it can be decoded with."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if not self._queue:
                return []
            first = self._queue.popleft()
            batch = [first]
            if self.max_batch > 1:
                key = first.params.batch_key()
                for job in list(self._queue):
                    if len(batch) >= self.max_batch:
                        break
                    if not job.cancel.is_set() and job.params.batch_key() == key:
                        self._queue.remove(job)
                        batch.append(job)
            self._running = batch
            self.largest_batch = max(self.largest_batch, len(batch))
            return batch

    def _continuous(self) -> bool:
        return self.max_batch > 1 and getattr(getattr(self.engine, "decoder", None), "pool", None) is not None

    def _loop(self) -> None:
        if self._continuous():
            return self._loop_continuous()
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                self._execute([job for job in batch if not job.cancel.is_set()])
            finally:
                for job in batch:
                    job.prepared = None  # free the pixel tensors now, not when the response ends
                    job.emit(DONE)
                with self._lock:
                    self._running = []

    def _take_joining(self, free: int, wait: bool, owners: dict[int, QueuedRequest]) -> list[Any]:
        """Up to ``free`` waiting jobs as engine jobs (blocking only when ``wait``)."""
        with self._ready:
            while wait and not self._queue and not self._closed:
                self._ready.wait()
            taken: list[Any] = []
            while self._queue and len(taken) < free and not self._closed:
                job = self._queue.popleft()
                if job.cancel.is_set():
                    job.prepared = None
                    job.emit(DONE)
                    continue
                try:
                    engine_job = self.engine.job(job.messages, job.params, job.prepared, job.cancel)
                except Exception as exc:  # noqa: BLE001 - this request's own error
                    self.failed += 1
                    job.emit(exc)
                    job.emit(DONE)
                    continue
                owners[id(engine_job)] = job
                self._running.append(job)
                taken.append(engine_job)
            self.largest_batch = max(self.largest_batch, len(self._running))
            return taken

    def _loop_continuous(self) -> None:
        while not self._closed:
            owners: dict[int, QueuedRequest] = {}
            try:
                for engine_job, chunk in self.engine.run_continuous(
                        lambda free, wait: self._take_joining(free, wait, owners), self.max_batch):
                    job = owners[id(engine_job)]
                    job.emit(chunk)
                    if chunk.finish_reason is not None:
                        self._finished(job)
                        self.completed += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the requests that own the jobs
                with self._lock:
                    running = list(self._running)
                self.failed += len(running)
                for job in running:
                    job.emit(exc)
                    self._finished(job)
        with self._lock:
            left, self._queue = list(self._queue), collections.deque()
        for job in left:  # cancelled by close(): end their responses
            job.prepared = None
            job.emit(DONE)

    def _finished(self, job: QueuedRequest) -> None:
        job.prepared = None  # free the pixel tensors now, not when the response ends
        job.emit(DONE)
        with self._lock:  # by identity: QueuedRequest compares by value, tensors included
            self._running = [j for j in self._running if j is not job]

    def _execute(self, batch: list[QueuedRequest]) -> None:
        try:
            if len(batch) == 1:
                job = batch[0]
                for chunk in self.engine.stream(job.messages, job.params, prepared=job.prepared,
                                                cancel=job.cancel):
                    job.emit(chunk)
            elif batch:
                jobs = [self.engine.job(j.messages, j.params, j.prepared, j.cancel) for j in batch]
                for index, chunk in self.engine.run_jobs(jobs):
                    batch[index].emit(chunk)
            self.completed += len(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the requests that own the jobs
            self.failed += len(batch)
            for job in batch:
                job.emit(exc)
