"""Which request runs on the model, and when: admission, a FIFO queue, one worker thread.

The server talks to the model only through :class:`Scheduler`:

- ``admit()`` reserves a place (raises :class:`~qwenvl_cli.serve.api.Busy`, HTTP 429, when
  ``max_pending`` requests are already admitted), before any media is decoded;
- ``submit(job)`` queues a prepared job; the worker runs jobs one at a time with
  ``engine.stream(..., prepared=, cancel=)`` and hands every chunk to ``job.emit``
  (from the worker thread; the server bridges it into its event loop);
- a job whose client went away is taken out of the queue at once (``discard``: its place
  and its pixel tensors are freed) and stops generating at the next token if running;
- ``close(grace)`` refuses new work, waits up to ``grace`` seconds for the queue to drain,
  then fails every waiting job with :class:`Unavailable` (HTTP 503) and cuts the running
  ones: a cut job receives :class:`Cut` (also a 503), never a "stop" that would pass a
  fraction of an answer off as whole;
- the worker runs under a supervisor: whatever ends its loop (a bug, not a request's own
  error) fails every waiting and running job with a 503, marks the scheduler ``failure``
  and calls ``on_failure`` (the server then answers /health 503 and exits non-zero).

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


class Cut(Unavailable):
    """A running answer was stopped before it was complete (the server is shutting down)."""

    code = "answer_cut"


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
    def __init__(self, engine: Any, max_pending: int = 32, max_batch: int = 1,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.on_failure = on_failure
        self.failure: BaseException | None = None
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
        self.cut = 0  # answers stopped by a shutdown before they were complete
        self.abandoned = 0  # jobs whose client went away
        self._worker = threading.Thread(target=self._supervised, name="qvl-scheduler", daemon=True)
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
                    "failed": self.failed, "cut": self.cut,
                    "abandoned": self.abandoned, "max_pending": self.max_pending,
                    "max_batch": self.max_batch, "largest_batch": self.largest_batch}

    def discard(self, job: QueuedRequest) -> None:
        """The client went away: stop the job, and if it still waits, drop it from the queue now."""
        if job.cancel.is_set():
            return
        job.cancel.set()
        with self._ready:
            self.abandoned += 1
            waiting = any(j is job for j in self._queue)
            if waiting:
                self._remove(job)
        if waiting:
            job.prepared = None
            job.emit(DONE)

    def close(self, timeout: float = 10.0, grace: float = 0.0) -> None:
        """Refuse new work; after up to ``grace`` s for the queue to drain, fail what waits with
        503, cut what runs, and stop the worker."""
        deadline = time.monotonic() + max(0.0, grace)
        with self._ready:
            self._closed = True
            while (self._queue or self._running) and time.monotonic() < deadline:
                self._ready.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            left, self._queue = list(self._queue), collections.deque()
            for job in self._running:
                job.cancel.set()
            self._ready.notify_all()
        self._fail(left, Unavailable("the server shut down before this request's turn",
                                     "retry in a moment, on this server once restarted or on another"))
        self._worker.join(timeout)

    # --- the supervisor -------------------------------------------------------------------

    def _supervised(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the loop itself broke: fail everything, report
            with self._ready:
                self.failure = exc
                self._closed = True
                left = list(self._queue) + list(self._running)
                self._queue, self._running = collections.deque(), []
            self._fail(left, Unavailable(f"the server's scheduler stopped ({type(exc).__name__}: {exc})",
                                         "retry on a restarted server; the log has the details"))
            if self.on_failure is not None:
                self.on_failure(exc)

    def _fail(self, jobs: list[QueuedRequest], error: BaseException) -> None:
        for job in jobs:
            job.cancel.set()
            job.prepared = None
            self.failed += 1
            job.emit(error)
            job.emit(DONE)

    def _remove(self, job: QueuedRequest) -> None:
        """Take ``job`` out of the queue by identity (its dataclass ``==`` compares tensors)."""
        self._queue = collections.deque(j for j in self._queue if j is not job)

    def _deliver(self, job: QueuedRequest, chunk: Any) -> None:
        """One chunk to its job; a job cut by close() gets Cut, not a finish that looks whole."""
        if getattr(chunk, "finish_reason", None) == "cancelled" and self._closed:
            if chunk.text:
                job.emit(type(chunk)(text=chunk.text))
            self.cut += 1
            job.emit(Cut("the server shut down before the answer was complete",
                         "send the request again, on this server once restarted or on another"))
            return
        job.emit(chunk)

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
                        self._remove(job)
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
                with self._ready:
                    self._running = []
                    self._ready.notify_all()

    def _take_joining(self, free: int, wait: bool, owners: dict[int, QueuedRequest]) -> list[Any]:
        """Up to ``free`` waiting jobs as engine jobs (blocking only when ``wait``)."""
        with self._ready:
            while wait and not self._queue and not self._closed:
                self._ready.wait()
            taken: list[Any] = []
            while self._queue and len(taken) < free:  # also while closing: the grace drains the queue
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
                    self._deliver(job, chunk)
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
        with self._ready:  # by identity: QueuedRequest compares by value, tensors included
            self._running = [j for j in self._running if j is not job]
            self._ready.notify_all()

    def _execute(self, batch: list[QueuedRequest]) -> None:
        try:
            if len(batch) == 1:
                job = batch[0]
                for chunk in self.engine.stream(job.messages, job.params, prepared=job.prepared,
                                                cancel=job.cancel):
                    self._deliver(job, chunk)
            elif batch:
                jobs = [self.engine.job(j.messages, j.params, j.prepared, j.cancel) for j in batch]
                for index, chunk in self.engine.run_jobs(jobs):
                    self._deliver(batch[index], chunk)
            self.completed += len(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the requests that own the jobs
            self.failed += len(batch)
            for job in batch:
                job.emit(exc)
