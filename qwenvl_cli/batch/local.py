"""`qvl batch` on a model loaded in this process: batched decoding, with the next batch
prepared (media loaded and resized, prompt tokenized) on background threads meanwhile.

A request whose preparation fails (missing image, unreadable video, prompt too long)
becomes an error record; the rest of its batch decodes. A batch whose generation fails
(out of memory, for one) is split in halves and retried, down to single requests, so one
bad request or an optimistic batch size costs only its own answer.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from qwenvl_cli.batch.files import Request, error_text, record
from qwenvl_cli.errors import QvlError, translate
from qwenvl_cli.generation import Answer

Emit = Callable[[dict[str, Any]], None]


@dataclass
class PreparedBatch:
    """One batch after preparation: the jobs that can decode, the requests that failed."""

    jobs: list[tuple[Request, Any]]  # (request, engine Job)
    failed: list[tuple[Request, str]]  # (request, error text)


def prep_workers() -> int:
    """Threads preparing requests: half the cores (the other half decodes), 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class Prefetcher:
    """Prepares batches ahead of the decoder on daemon threads; iterate to get them in order.

    At most ``ahead`` prepared batches wait (their pixel tensors stay in memory), so the
    next batch is ready when the current one has decoded. ``close`` stops it (Ctrl-C,
    --fail-fast), waiting at most a few seconds for the request being prepared.
    """

    def __init__(self, engine: Any, batches: Sequence[Sequence[Request]], ahead: int = 1,
                 workers: int | None = None) -> None:
        self.engine = engine
        self.batches = batches
        self.ready: queue.Queue = queue.Queue()
        self.permits = threading.Semaphore(ahead + 1)  # +1: the batch being decoded
        self.stop = threading.Event()
        self.workers = workers or prep_workers()
        self.pool = _Pool(self.workers, self.stop)
        self.thread = threading.Thread(target=self._produce, name="qvl-batch-prepare", daemon=True)

    def __enter__(self) -> Prefetcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self, wait: float = 5.0) -> None:
        """Stop preparing; wait up to ``wait`` seconds for the request being prepared, so
        that the interpreter does not shut down under a thread busy in torch or PyAV."""
        self.stop.set()
        self.permits.release()
        self.pool.close()
        deadline = time.monotonic() + wait
        for thread in [self.thread, *self.pool.threads]:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def __iter__(self) -> Iterator[PreparedBatch]:
        for _ in self.batches:
            item = self.ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            self.permits.release()  # the batch is decoded: prepare one more

    def _produce(self) -> None:
        try:
            for batch in self.batches:
                self.permits.acquire()
                if self.stop.is_set():
                    return
                self.ready.put(self._prepare(batch))
        except BaseException as exc:  # noqa: BLE001 - handed to the decoding thread
            self.ready.put(exc)

    def _prepare(self, batch: Sequence[Request]) -> PreparedBatch:
        results = self.pool.map(lambda r: self.engine.job(r.messages, r.params), batch)
        out = PreparedBatch([], [])
        for request, (job, exc) in zip(batch, results):
            if exc is None:
                out.jobs.append((request, job))
            else:
                out.failed.append((request, error_text(translate(exc) or exc)))
        return out


class _Pool:
    """A few daemon threads running one function over a batch (results in order, each
    with its exception); daemon so that an interrupted run exits at once."""

    def __init__(self, workers: int, stop: threading.Event) -> None:
        self.tasks: queue.Queue = queue.Queue()
        self.stop = stop
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"qvl-batch-prep-{i}")
                        for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            fn, item, slot, done = task
            try:
                slot.append((None if self.stop.is_set() else fn(item), None))
            except Exception as exc:  # noqa: BLE001 - a bad request, recorded as its error
                slot.append((None, exc))
            done.release()

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[tuple[Any, BaseException | None]]:
        slots: list[list] = [[] for _ in items]
        done = threading.Semaphore(0)
        for item, slot in zip(items, slots):
            self.tasks.put((fn, item, slot, done))
        for _ in items:
            done.acquire()
        return [slot[0] for slot in slots]

    def close(self) -> None:
        for _ in self.threads:
            self.tasks.put(None)


def run(engine: Any, batches: Sequence[Sequence[Request]], emit: Emit, workers: int | None = None) -> None:
    """Decode ``batches`` in order, emitting one record per request as it finishes."""
    with Prefetcher(engine, batches, workers=workers) as prefetcher:
        for prepared in prefetcher:
            for request, error in prepared.failed:
                emit(record(request.id, error=error))
            if prepared.jobs:
                decode(engine, prepared.jobs, emit)


def decode(engine: Any, jobs: list[tuple[Request, Any]], emit: Emit) -> None:
    """One batch through ``engine.run_jobs``; on a failure, the unfinished requests are
    retried in two halves (a single request's failure becomes its error record)."""
    answers = [Answer() for _ in jobs]
    finished = [False] * len(jobs)
    try:
        for index, chunk in engine.run_jobs([job for _, job in jobs]):
            answer = answers[index]
            answer.add(chunk)
            if chunk.finish_reason is not None:
                finished[index] = True
                request = jobs[index][0]
                emit(record(request.id, answer.text, answer.usage.to_dict() if answer.usage else None,
                            answer.finish_reason))
    except QvlError as exc:
        left = [pair for pair, done in zip(jobs, finished) if not done]
        _release_memory(engine)
        if len(jobs) == 1:
            for request, _ in left:
                emit(record(request.id, error=error_text(exc)))
            return
        half = max(1, len(left) // 2)  # a lone survivor is retried alone: the batch may have been the cause
        decode(engine, left[:half], emit)
        if left[half:]:
            decode(engine, left[half:], emit)


def _release_memory(engine: Any) -> None:
    """After an out-of-memory error, give the cached blocks back before retrying smaller."""
    engine.release_memory()
