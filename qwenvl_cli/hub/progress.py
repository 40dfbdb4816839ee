"""Download progress on stderr: a rich display on a terminal, plain periodic lines
otherwise, nothing with --quiet. Thread-safe: several files download at once.

The display shows the whole model (bytes, speed, ETA) and one row per file in flight.
"""

from __future__ import annotations

import sys
import threading
import time

from qwenvl_cli import render, settings


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def human_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Counts bytes for a whole model; subclasses draw. This base draws nothing (--quiet)."""

    def __init__(self, title: str, total: int, done: int = 0) -> None:
        self.title = title
        self.total = total
        self.done = done
        self.start_done = done
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.current: set[str] = set()
        self.per_file: dict[str, int] = {}  # bytes counted for each file, so a retry is not counted twice

    # --- the interface the downloaders use (files are named by their path) --------------

    def start_file(self, name: str, size: int | None, initial: int = 0) -> None:
        with self.lock:
            self.current.add(name)
            self.done += initial - self.per_file.get(name, 0)
            self.per_file[name] = initial
            self._on_start(name, size, initial)

    def advance(self, name: str, n: int) -> None:
        with self.lock:
            self.done += n
            self.per_file[name] = self.per_file.get(name, 0) + n
            self._on_advance(name, n)

    def end_file(self, name: str) -> None:
        with self.lock:
            self.current.discard(name)
            self._on_end(name)

    def forget(self, name: str) -> None:
        """A file was thrown away (it failed its check): take its bytes off the count."""
        with self.lock:
            self.done -= self.per_file.pop(name, 0)
            self.current.discard(name)
            self._on_end(name)

    def note(self, message: str) -> None:
        """A status line that does not break the display."""

    def close(self) -> None:
        """Stop drawing."""

    # --- figures ------------------------------------------------------------------------

    def speed(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        speed = self.speed()
        return (self.total - self.done) / speed if speed > 0 else None

    def _on_start(self, name: str, size: int | None, initial: int) -> None:
        pass

    def _on_advance(self, name: str, n: int) -> None:
        pass

    def _on_end(self, name: str) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PlainProgress(Progress):
    """One line every few seconds, for logs and pipes."""

    def __init__(self, title: str, total: int, done: int = 0) -> None:
        super().__init__(title, total, done)
        self.interval = settings.progress_interval()
        self.last = 0.0

    def line(self) -> str:
        pct = 100 * self.done / self.total if self.total else 100.0
        eta = self.eta()
        current = ", ".join(sorted(self.current))
        return (f"{self.title}: {pct:.0f}% {human_bytes(self.done)} of {human_bytes(self.total)}, "
                f"{human_bytes(self.speed())}/s, ETA {human_seconds(eta) if eta is not None else '?'}"
                + (f" [{current}]" if current else ""))

    def _tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self.last = now
            sys.stderr.write(self.line() + "\n")
            sys.stderr.flush()

    def _on_start(self, name: str, size: int | None, initial: int) -> None:
        self._tick()

    def _on_advance(self, name: str, n: int) -> None:
        self._tick()

    def note(self, message: str) -> None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        with self.lock:
            self.current.clear()
            self._tick(force=True)


class RichProgress(Progress):
    """A live display: the model's bar with bytes, speed and ETA, then a row per file."""

    def __init__(self, title: str, total: int, done: int = 0) -> None:
        super().__init__(title, total, done)
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
        from rich.progress import Progress as Bars

        self.bars = Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                         TransferSpeedColumn(), TimeRemainingColumn(),
                         console=render.stderr_console(), transient=False)
        self.model_task = self.bars.add_task(render.escape(title), total=total, completed=done)
        self.tasks: dict[str, int] = {}
        self.bars.start()

    def _on_start(self, name: str, size: int | None, initial: int) -> None:
        task = self.tasks.get(name)
        if task is None:
            self.tasks[name] = self.bars.add_task(f"  {render.escape(name)}", total=size, completed=initial)
        else:
            self.bars.update(task, total=size, completed=initial)
        self.bars.update(self.model_task, completed=self.done)

    def _on_advance(self, name: str, n: int) -> None:
        if name in self.tasks:
            self.bars.advance(self.tasks[name], n)
        self.bars.update(self.model_task, completed=self.done)

    def _on_end(self, name: str) -> None:
        task = self.tasks.pop(name, None)
        if task is not None:
            self.bars.remove_task(task)
        self.bars.update(self.model_task, completed=self.done)

    def note(self, message: str) -> None:
        self.bars.console.print(f"[dim]{render.escape(message)}[/dim]")

    def close(self) -> None:
        self.bars.stop()


def make(title: str, total: int, done: int = 0, quiet: bool = False) -> Progress:
    """The display that fits: nothing when quiet, rich on a terminal, plain lines otherwise."""
    if quiet:
        return Progress(title, total, done)
    if render.stderr_console().is_terminal:
        return RichProgress(title, total, done)
    return PlainProgress(title, total, done)
