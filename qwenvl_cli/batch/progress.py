"""`qvl batch` progress and the closing summary, on stderr.

On a terminal: a rich progress bar (requests done / total, failures, tokens/s, ETA).
Elsewhere (a log file, CI): a plain line at most every ``interval`` seconds. ``--quiet``:
nothing until the summary's failure count (which the exit code reflects anyway).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Tally:
    """What this run did: the figures of the summary line."""

    total: int  # requests this run has to answer
    skipped: int = 0  # answered by an earlier run
    done: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    timed: bool = False  # some request went to a model: the speeds mean something

    def add(self, rec: dict[str, Any]) -> None:
        self.done += 1
        if rec.get("error") is not None:
            self.failed += 1
        usage = rec.get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)

    @property
    def seconds(self) -> float:
        return max((self.ended or time.perf_counter()) - self.started, 1e-9)

    @property
    def requests_per_second(self) -> float:
        return self.done / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds

    def eta(self) -> float | None:
        if not self.done:
            return None
        return (self.total - self.done) / self.requests_per_second

    def summary(self, interrupted: bool = False) -> str:
        """'64 requests in 12.3 s: 5.2 requests/s, 830 tokens/s generated (1,234 prompt
        tokens/s); 2 failed; 10 skipped (answered before)'."""
        head = f"{self.done} of {self.total} requests" if interrupted else f"{self.done} requests"
        if self.timed:
            parts = [f"{head} in {self.seconds:.1f} s: {self.requests_per_second:.2f} requests/s, "
                     f"{self.tokens_per_second:.1f} tokens/s generated "
                     f"({self.prompt_tokens / self.seconds:.1f} prompt tokens/s)"]
        else:  # every line failed before any model ran: no speed to report
            parts = [f"{head}: none reached the model"]
        if self.failed:
            parts.append(f"{self.failed} failed (their output lines have \"error\" set; rerun to retry them)")
        if self.skipped:
            parts.append(f"{self.skipped} skipped (answered before)")
        return "; ".join(parts)


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def plain_line(tally: Tally) -> str:
    failed = f" ({tally.failed} failed)" if tally.failed else ""
    return (f"batch: {tally.done}/{tally.total} done{failed}, {tally.requests_per_second:.2f} requests/s, "
            f"{tally.tokens_per_second:.1f} tokens/s, ETA {clock(tally.eta())}")


class BatchProgress:
    """Shows a Tally as it grows; a context manager (the bar is removed on exit)."""

    def __init__(self, tally: Tally, quiet: bool = False, stream: TextIO | None = None,
                 interval: float = 10.0) -> None:
        from qwenvl_cli import render

        self.tally = tally
        self.quiet = quiet
        self.console = render.stderr_console()
        self.stream = stream or sys.stderr
        self.interval = interval
        self.last = time.perf_counter()
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> BatchProgress:
        if not self.quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("[dim]batch[/dim]"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("batch", total=self.tally.total, info="")
        return self

    def update(self) -> None:
        tally = self.tally
        if self.bar is not None:
            failed = f"[red]{tally.failed} failed[/red] " if tally.failed else ""
            info = f"{failed}{tally.tokens_per_second:.1f} tok/s  ETA {clock(tally.eta())}"
            self.bar.update(self.task, completed=tally.done, info=info)
        elif not self.quiet and time.perf_counter() - max(self.last, tally.started) >= self.interval:
            self.last = time.perf_counter()
            self.stream.write(plain_line(tally) + "\n")
            self.stream.flush()

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
