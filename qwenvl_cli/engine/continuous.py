"""Continuous batching: requests join a running batch between two decode steps.

:func:`run` drives one model for a scheduler. It asks ``take(free, wait)`` for up to
``free`` new jobs between decode steps (``wait`` is True when nothing is running: block
until work comes, or return nothing to end), and yields ``(job, chunk)`` as every job's
tokens arrive; a finished or cancelled job frees its row for the next one.

How a job joins (:class:`Session`): all rows share one static cache of (B, L) positions
and one write index ``t`` (transformers' StaticCache writes every row at the same
position). A joining prompt of P tokens is prefilled on its own (with the other joiners,
left-padded, one vision-tower call), and its keys and values are copied into a free row
at positions [t - P, t), with the positions before masked out as padding: the same
layout as a left-padded batch, so the captured or compiled step of (B, L) serves it
unchanged. When the cache would overflow, the rows are shifted left by the oldest row's
start (compaction); when a prompt is longer than ``t``, they are shifted right. Batch
sizes are buckets (1, 2, 4, 8, ...): a session grows by moving its rows into a larger
cache, so that one client does not pay for sixteen rows of attention.

Engines without a static cache (transformers' generate, or the eager step) get static
batching instead: the jobs waiting when a batch starts are decoded together with
``Engine.run_jobs`` and newcomers join the next batch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Take = Callable[[int, bool], Sequence[Any]]


def batch_bucket(n: int, limit: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return min(size, max(limit, n))


def eligible(job: Any) -> bool:
    """Jobs whose sampling does not look at the sequence so far (no repetition penalty)."""
    return job.params.history_free()


def run(engine: Any, take: Take, max_batch: int = 16, length: int | None = None) -> Iterator[tuple[Any, Any]]:
    """See the module docstring; ``length`` fixes the cache length of every session
    (default: twice the longest need of the jobs a session starts with, bucketed)."""
    decoder = engine.decoder
    pending: deque = deque()
    if getattr(decoder, "pool", None) is None:
        yield from _static_batches(engine, take, max_batch, pending)
        return
    while True:
        if not pending:
            pending.extend(take(max_batch, True))
        if not pending:
            return
        head = pending[0]
        if not eligible(head):
            pending.popleft()
            yield from ((head, c) for _, c in engine._run([head]))
            continue
        session = Session(engine, head.params.batch_key(), max_batch, length)
        yield from session.run(take, pending)


def _static_batches(engine: Any, take: Take, max_batch: int, pending: deque) -> Iterator[tuple[Any, Any]]:
    while True:
        pending.extend(take(max_batch - len(pending), not pending))
        if not pending:
            return
        key = pending[0].params.batch_key()
        batch = [j for j in pending if j.params.batch_key() == key][:max_batch]
        taken = {id(j) for j in batch}  # Job compares by value (tensors): go by identity
        rest = [j for j in pending if id(j) not in taken]
        pending.clear()
        pending.extend(rest)
        for i, chunk in engine._run(batch):
            yield batch[i], chunk


class Session:
    """Rows of one static cache decoding together; see the module docstring."""

    def __init__(self, engine: Any, key: tuple, max_batch: int, length: int | None = None) -> None:
        self.engine = engine
        self.length = length
        self.decoder = engine.decoder
        self.model = engine.model
        self.key = key
        self.max_batch = max_batch
        self.rows: list[Any] = []  # _Row or None per cache row
        self.t = 0
        self.slot = self.runner = None
        self.tokens = None  # (B,) device: the token each row feeds next
        self.selector = None
        self.stats = {"joins": 0, "shifts": 0, "compactions": 0, "grows": 0, "steps": 0, "batch": 0, "length": 0}
        self.decoder.last = {"continuous": self.stats}

    # --- the loop ---------------------------------------------------------------------------

    def run(self, take: Take, pending: deque) -> Iterator[tuple[Any, Any]]:
        import torch

        from qwenvl_cli.engine.fastpath import _Readback

        try:
            with torch.inference_mode():
                yield from self._admit_waiting(take, pending)
                readback = None
                while any(self.rows):
                    if readback is None or readback.slots[0][0].shape[0] != len(self.rows):
                        readback = _Readback.make(torch, len(self.rows), self.tokens.device)
                    sent = readback.send(self.tokens)
                    logits = self.runner.step(self.tokens)  # queued before the host waits
                    self.t += 1
                    self.stats["steps"] += 1
                    now_tokens = _Readback.receive(sent)
                    yield from self._deliver(now_tokens)
                    self.tokens = self.selector(logits)
                    yield from self._admit_waiting(take, pending)
        finally:
            if self.slot is not None:
                self.slot.release()

    def _deliver(self, tokens: list[int]) -> Iterator[tuple[Any, Any]]:
        now = time.perf_counter()
        for b, row in enumerate(self.rows):
            if row is None:
                continue
            chunks = (row.stream.close("cancelled", now) if row.job.cancel.is_set()
                      else row.stream.push([tokens[b]], now))
            for chunk in chunks:
                yield row.job, chunk
            if row.stream.done:
                self.rows[b] = None
                self.slot.attn2d[b].fill_(1)  # a free row attends to something: no NaN

    # --- joining ----------------------------------------------------------------------------

    def _admit_waiting(self, take: Take, pending: deque) -> Iterator[tuple[Any, Any]]:
        free = self.max_batch - sum(r is not None for r in self.rows)
        if free and not pending:
            pending.extend(take(free, not any(self.rows)))
        joining = []
        while pending and len(joining) < free:
            job = pending[0]
            if job.cancel.is_set():
                pending.popleft()
                yield from self._cancelled(job)
                continue
            if job.params.batch_key() != self.key or not eligible(job) or not self._fits(joining + [job]):
                break
            joining.append(pending.popleft())
        if joining:
            self._join(joining)

    def _cancelled(self, job: Any) -> Iterator[tuple[Any, Any]]:
        from qwenvl_cli.generation import TokenStream

        stream = TokenStream(self.engine._decode, self.engine.eos_ids, job.params.stop, job.max_new,
                             job.prepared.prompt_tokens, job.start)
        for chunk in stream.close("cancelled", time.perf_counter()):
            yield job, chunk

    def _active(self) -> list[tuple[int, Any]]:
        return [(b, r) for b, r in enumerate(self.rows) if r is not None]

    def _fits(self, jobs: list[Any]) -> bool:
        return self._plan(jobs) is not None

    def _plan(self, jobs: list[Any]) -> int | None:
        """How far to move the rows left before ``jobs`` join (0: not at all), or None when
        they cannot join this cache. A new cache (no active rows) is sized for them."""
        active = self._active()
        if self.slot is None or not active:
            return 0
        longest = max(j.prepared.prompt_tokens for j in jobs)
        need = max([j.max_new + 1 for j in jobs] + [r.job.max_new - r.stream.count + 1 for _, r in active])

        def fits(t: int) -> bool:
            return max(t, longest) + need <= self.slot.length

        if fits(self.t):
            return 0
        low = min(r.start for _, r in active)
        if low and fits(self.t - low):
            return -low
        return None

    def _join(self, jobs: list[Any]) -> None:
        from qwenvl_cli.generation import TokenStream

        active = self._active()
        if not active:
            self._start(jobs)
        else:
            move = self._plan(jobs)
            if move:
                self._move(move)  # compaction
                self.stats["compactions"] += 1
            longest = max(j.prepared.prompt_tokens for j in jobs)
            if longest > self.t:
                self._move(longest - self.t)
                self.stats["shifts"] += 1
            if len(active) + len(jobs) > len(self.rows):
                self._grow(len(active) + len(jobs))
                self.stats["grows"] += 1
        self.stats["joins"] += len(jobs)
        inputs = self.engine.collate([j.prepared for j in jobs]) if len(jobs) > 1 else dict(jobs[0].prepared.inputs)
        inputs = {k: v.to(self.slot.device) for k, v in inputs.items()}
        first, keys, values, pos = self._prefill(inputs)
        free = [b for b, r in enumerate(self.rows) if r is None]
        for i, job in enumerate(jobs):
            b, n = free[i], job.prepared.prompt_tokens
            start = self.t - n
            for layer, k, v in zip(self.slot.cache.layers, keys, values):
                layer.keys[b, :, start:self.t].copy_(k[i, :, -n:])
                layer.values[b, :, start:self.t].copy_(v[i, :, -n:])
            self.slot.attn2d[b].fill_(1)
            self.slot.attn2d[b, :start].fill_(0)
            self.slot.pos[:, b].copy_(pos[:, i])
            self.tokens[b] = first[i]
            stream = TokenStream(self.engine._decode, self.engine.eos_ids, job.params.stop, job.max_new,
                                 n, job.start)
            self.rows[b] = _Row(job, stream, start)
        del keys, values  # the copies are queued on the stream before the next step

    def _prefill(self, inputs: dict[str, Any]) -> tuple[Any, list[Any], list[Any], Any]:
        """Run the joiners' prompts (eager, DynamicCache); their first tokens, K/V and next positions."""
        from qwenvl_cli.engine.decode_step import EagerRunner

        ids = inputs["input_ids"]
        runner = EagerRunner(self.model, ids.shape[0], ids.shape[1] + 1)
        position_ids = self.model._prepare_position_ids_for_generation(ids, dict(inputs))
        logits = runner.prefill(inputs, position_ids)
        first = self.selector(logits)
        layers = runner.cache.layers
        return first, [layer.keys for layer in layers], [layer.values for layer in layers], runner.pos

    # --- the cache ---------------------------------------------------------------------------

    def _start(self, jobs: list[Any]) -> None:
        """A fresh cache sized for these jobs (twice the longest need, for joiners)."""
        import torch

        from qwenvl_cli.engine import decode_step as ds

        need = max(j.prepared.prompt_tokens + j.max_new + 1 for j in jobs)
        limit = self.decoder.context_length + 1 if self.decoder.context_length else None
        batch = batch_bucket(len(jobs), self.max_batch)
        length = ds.bucket(self.length or min(2 * need, limit or 2 * need), limit)
        if self.slot is not None:
            self.slot.release()
        self.slot = self.decoder.pool.acquire(batch, length)
        self.slot.prepare(self.model, self.decoder.config.step)
        self.runner = self.decoder.runner_for(self.slot)
        self.rows = [None] * batch
        self.stats.update(batch=batch, length=length)
        self.t = max(j.prepared.prompt_tokens for j in jobs)
        self._set_written(self.t)
        self.tokens = torch.full((batch,), self.engine.pad_id, dtype=torch.long, device=self.slot.device)
        if self.selector is None:
            self.selector = _selector(self.engine, jobs[0])

    def _set_written(self, t: int) -> None:
        for layer in self.slot.cache.layers:
            layer.cumulative_length.fill_(t)

    def _move(self, d: int) -> None:
        """Move every row's cache contents by d positions (left if negative)."""
        length = self.slot.length
        for layer in self.slot.cache.layers:
            for buf in (layer.keys, layer.values):
                if d < 0:
                    buf[:, :, :length + d] = buf[:, :, -d:].clone()
                else:
                    buf[:, :, d:] = buf[:, :, :length - d].clone()
        attn = self.slot.attn2d
        if d < 0:
            attn[:, :length + d] = attn[:, -d:].clone()
            attn[:, length + d:] = 1
        else:
            attn[:, d:] = attn[:, :length - d].clone()
            attn[:, :d] = 0
        for b, row in self._active():
            row.start += d
        for b, row in enumerate(self.rows):
            if row is None:
                attn[b].fill_(1)
        self.t += d
        self._set_written(self.t)

    def _grow(self, n: int) -> None:
        """Move the rows into a cache with a larger batch bucket (same length)."""
        import torch

        batch = batch_bucket(n, self.max_batch)
        old, old_rows = self.slot, len(self.rows)
        new = self.decoder.pool.acquire(batch, old.length)
        new.prepare(self.model, self.decoder.config.step)
        for src, dst in zip(old.cache.layers, new.cache.layers):
            dst.keys[:old_rows].copy_(src.keys)
            dst.values[:old_rows].copy_(src.values)
        new.attn2d.fill_(1)
        new.attn2d[:old_rows].copy_(old.attn2d)
        new.pos[:, :old_rows].copy_(old.pos)
        tokens = torch.full((batch,), self.engine.pad_id, dtype=torch.long, device=new.device)
        tokens[:old_rows] = self.tokens
        old.release()
        self.slot, self.tokens = new, tokens
        self.rows += [None] * (batch - old_rows)
        self.stats["batch"] = batch
        self.runner = self.decoder.runner_for(new)
        self._set_written(self.t)


class _Row:
    def __init__(self, job: Any, stream: Any, start: int) -> None:
        self.job, self.stream, self.start = job, stream, start


def _selector(engine: Any, job: Any) -> Callable[[Any], Any]:
    """Token choice for a session (shared sampling parameters; no history-dependent processors)."""
    import torch

    from qwenvl_cli.engine.sampling import Sampler

    kwargs = engine.generate_kwargs(job.params, job.max_new)
    kwargs.pop("min_new_tokens", None)
    dummy = torch.zeros((1, 1), dtype=torch.long, device=engine.plan.input_device)
    sampler, _ = Sampler.build(engine.model, dummy, kwargs)
    eos = sampler.eos if job.params.ignore_eos else None

    def select(logits: Any) -> Any:
        if eos is not None:
            logits = logits.index_fill(-1, eos, float("-inf"))
        return sampler.select(None, logits)

    return select
