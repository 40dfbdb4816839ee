"""`qvl batch` files: the input lines, the output records, and resumption. Pure; no torch.

Input: one JSON object per line, ``{"id": ..., "messages": [...], <generation options>}``
(OpenAI or Qwen content parts), or an OpenAI Batch API line (``custom_id`` + ``body``).
A line without an id gets its 1-based line number as id; a line whose id cannot be read (not
JSON, not an object, an id that is not a string or an integer) gets ``"id": null`` and an
error naming its line, so it never takes an id another line gives explicitly. Output: one record per request,
``{"id", "text", "usage", "finish_reason", "error"}``, appended and flushed as it finishes.

Resumption: ids answered successfully in an existing output are skipped; lines with an
error are dropped from the output and retried (the output is rewritten once, atomically);
a truncated last line (a crash in mid-write) is dropped the same way.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from qwenvl_cli import messages as msgs
from qwenvl_cli.errors import QvlError, UsageError
from qwenvl_cli.generation import GenerationParams

# per-line generation options: name -> (accepted JSON types, what to say when wrong)
_INT = (int,)
_NUM = (int, float)
LINE_OPTIONS = {"max_tokens": _INT, "temperature": _NUM, "top_p": _NUM, "top_k": _INT,
                "repetition_penalty": _NUM, "seed": _INT, "stop": (str, list)}
ALIASES = {"max_completion_tokens": "max_tokens", "max_new_tokens": "max_tokens"}
# keys an OpenAI request or a Batch API line may carry that qvl reads or ignores on purpose
KNOWN_KEYS = {"id", "custom_id", "messages", "body", "method", "url", "model", "metadata",
              "stream", "n", *LINE_OPTIONS, *ALIASES}


class DuplicateIds(UsageError):
    """The input file gives the same id to several lines."""


class NotBatchOutput(UsageError):
    """The output file exists and holds something other than `qvl batch` records."""


@dataclass
class Request:
    """One input line that parsed: its id, conversation (Qwen format) and options."""

    id: Any
    line: int
    messages: list[dict[str, Any]]
    params: GenerationParams
    size: tuple[int, int, int] = (0, 0, 0)  # (videos, images, characters): a length proxy


@dataclass
class BadLine:
    """An input line that cannot run; it becomes an output record with `error` set."""

    id: Any
    line: int
    error: str


def record(id_: Any, text: str | None = None, usage: dict[str, int] | None = None,
           finish_reason: str | None = None, error: str | None = None) -> dict[str, Any]:
    """One output line."""
    return {"id": id_, "text": text, "usage": usage, "finish_reason": finish_reason, "error": error}


def error_text(exc: BaseException) -> str:
    """The one line an output record carries for a failed request."""
    if isinstance(exc, QvlError):
        return exc.message + (f" ({exc.hint})" if exc.hint else "")
    return f"{type(exc).__name__}: {exc}"


def id_key(value: Any) -> str:
    """Ids compare as JSON values: 1 and "1" are different ids."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# --- input ----------------------------------------------------------------------------------


def read_input(path: Path, defaults: GenerationParams, image_opts: dict[str, Any] | None = None,
               video_opts: dict[str, Any] | None = None, prompt: str | None = None) -> list[Request | BadLine]:
    """Every non-blank line of ``path`` as a Request or a BadLine; DuplicateIds before anything runs.
    A folder of images or a Parquet file is read as one request per image with ``prompt``
    (batch/captions.py)."""
    from qwenvl_cli.batch import captions

    if captions.is_caption_input(path):
        texts = captions.lines(path, prompt)
        items = [parse_line(text, number, defaults, image_opts, video_opts) for number, text in enumerate(texts, 1)]
        check_unique(items)
        return items
    if prompt:
        raise UsageError("--prompt is for a folder of images or a Parquet file",
                         "a JSONL file's lines carry their own messages: drop --prompt")
    try:
        handle = path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}", "check the input file path") from None
    with handle:
        items = [parse_line(text, number, defaults, image_opts, video_opts)
                 for number, text in enumerate(handle, 1) if text.strip()]
    check_unique(items)
    return items


def parse_line(text: str, number: int, defaults: GenerationParams, image_opts: dict[str, Any] | None = None,
               video_opts: dict[str, Any] | None = None) -> Request | BadLine:
    """One input line -> Request, or BadLine with the reason (never raises for bad content)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadLine(None, number, f"line {number}: not valid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(data, dict):
        return BadLine(None, number, f"line {number}: expected a JSON object, got {type(data).__name__}")
    id_ = data.get("custom_id", data.get("id")) if "body" in data else data.get("id")
    if id_ is None:
        id_ = number
    elif not isinstance(id_, (str, int)) or isinstance(id_, bool):
        return BadLine(None, number, f"line {number}: the id must be a string or an integer, not {id_!r}")
    body = data.get("body") if isinstance(data.get("body"), dict) else data
    try:
        params = line_params(body, defaults).validated()
        messages = msgs.with_defaults(msgs.from_openai(body.get("messages")), image_opts, video_opts)
    except UsageError as exc:
        return BadLine(id_, number, f"line {number}: {error_text(exc)}")
    return Request(id_, number, messages, params, length_proxy(messages))


def line_params(body: dict[str, Any], defaults: GenerationParams) -> GenerationParams:
    """The line's generation options over the command line's; UsageError for bad ones."""
    values: dict[str, Any] = {}
    for key, value in body.items():
        name = ALIASES.get(key, key)
        if name not in LINE_OPTIONS:
            if key not in KNOWN_KEYS:
                close = difflib.get_close_matches(key, list(LINE_OPTIONS) + list(ALIASES), n=1, cutoff=0.8)
                if close:
                    raise UsageError(f"unknown option {key!r} (did you mean {close[0]}?)", "fix the key")
            continue
        if value is None:
            continue
        kinds = LINE_OPTIONS[name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            wanted = {_INT: "an integer", _NUM: "a number"}.get(kinds, "a string or a list of strings")
            raise UsageError(f"{key} must be {wanted}, not {value!r}", f"fix the value of {key}")
        values[name] = value
    if "stop" in values:
        stop = values["stop"]
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return defaults.merged(**values)


def length_proxy(messages: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(videos, images, characters of text): sorts requests of similar prompt length together
    without loading any media."""
    images, videos = msgs.media_count(messages)
    chars = sum(len(p.get("text", "")) for m in messages for p in m["content"] if p.get("type") == "text")
    return videos, images, chars


def check_unique(items: Iterable[Request | BadLine]) -> None:
    seen: dict[str, list[int]] = {}
    for item in items:
        if item.id is not None:  # a line with no readable id: its record says its line instead
            seen.setdefault(id_key(item.id), []).append(item.line)
    dups = [(k, lines) for k, lines in seen.items() if len(lines) > 1]
    if dups:
        shown = "; ".join(f"id {k} on lines {', '.join(map(str, lines))}" for k, lines in dups[:5])
        more = f" (and {len(dups) - 5} more)" if len(dups) > 5 else ""
        raise DuplicateIds(f"duplicate ids in the input: {shown}{more}",
                           "give every line its own id (a line without an id gets its line number)")


# --- output and resumption ---------------------------------------------------------------------


@dataclass
class Existing:
    """What an earlier run left in the output file."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # id key -> successful record
    failed: set[str] = field(default_factory=set)  # id keys of records with an error (retried)
    dropped: int = 0  # records dropped besides errors: duplicates, a truncated last line
    rewrite: bool = False  # the file must be rewritten without the dropped lines


def read_existing(path: Path) -> Existing:
    """Parse an earlier output; NotBatchOutput for a file that is not one (never overwrite it)."""
    out = Existing()
    if not path.exists():
        return out
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it: possibly cut off in mid-write
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if last:
                out.dropped += 1
                out.rewrite = True
                continue
            raise _not_output(path, number) from None
        if not isinstance(rec, dict) or "id" not in rec or "error" not in rec:
            raise _not_output(path, number)
        key = id_key(rec["id"])
        if rec["error"] is not None:
            out.failed.add(key)
            out.rewrite = True
        elif key in out.done:
            out.dropped += 1
            out.rewrite = True
        else:
            out.done[key] = rec
        if last:  # a complete record without its newline: keep it, but write the newline
            out.rewrite = True
    return out


def _not_output(path: Path, number: int) -> NotBatchOutput:
    return NotBatchOutput(f"{path} exists and line {number} is not a `qvl batch` record",
                          "choose another output file (-o); qvl only appends to its own output")


def rewrite(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records`` atomically (a crash leaves the old or the new file)."""
    tmp = path.with_name(path.name + ".qvl-tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for rec in records:
            handle.write(dumps(rec) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def dumps(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False)


class Output:
    """The output file, open for appending: one flushed line per finished request.

    Holds an exclusive lock (where the platform has fcntl) so that two runs never write
    the same file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"-o {path}: cannot create {path.parent} ({exc.strerror})",
                             "choose an output file in a directory you can write") from None
        self.handle: TextIO = self._open_locked()

    def _open_locked(self) -> TextIO:
        try:
            handle = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"-o {self.path}: cannot write it ({exc.strerror})",
                             "choose an output file you can write") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return handle
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UsageError(f"{self.path} is being written by another `qvl batch`",
                             "wait for it to finish, or choose another output file (-o)") from None
        return handle

    def replace(self, records: Iterable[dict[str, Any]]) -> None:
        """Rewrite the file with ``records`` atomically, keeping it locked throughout."""
        rewrite(self.path, records)
        old, self.handle = self.handle, self._open_locked()
        old.close()

    def write(self, rec: dict[str, Any]) -> None:
        self.handle.write(dumps(rec) + "\n")
        self.handle.flush()

    def close(self) -> None:
        if not self.handle.closed:
            try:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            finally:
                self.handle.close()


class StreamOutput(Output):
    """A pipe, FIFO or terminal as the output (``-o /dev/stdout``): answers are written as they
    come; nothing is read back, locked or rewritten, so there is no resumption."""

    FIFO_WAIT = 5.0  # seconds to wait for a reader of a FIFO

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = self._open_stream()

    def _open_stream(self) -> TextIO:
        import stat
        import time

        if not stat.S_ISFIFO(self.path.stat().st_mode):
            return self.path.open("a", encoding="utf-8")
        deadline = time.monotonic() + self.FIFO_WAIT
        while True:  # a FIFO without a reader would block open() for ever
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise UsageError(f"no process reads the FIFO {self.path} (waited {self.FIFO_WAIT:g} s)",
                                     f"start its reader first, e.g. `cat {self.path} &`") from None
                time.sleep(0.05)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "w", encoding="utf-8")

    def replace(self, records: Iterable[dict[str, Any]]) -> None:  # pragma: no cover - never called
        raise UsageError(f"{self.path} is not a file", "resumption needs a regular output file")

    def write(self, rec: dict[str, Any]) -> None:
        try:
            super().write(rec)
        except BrokenPipeError:
            raise UsageError(f"the reader of {self.path} went away", "keep the reading process running, "
                             "or write to a file with -o answers.jsonl and rerun to resume") from None

    def close(self) -> None:
        try:
            if not self.handle.closed:
                self.handle.close()
        except OSError:  # the reader went away: nothing more to flush
            pass


def check_output(path: Path, input_path: Path) -> None:
    """Refuse an output that cannot be written (exit 2), before anything is loaded."""
    if path.exists() and input_path.exists() and path.resolve() == input_path.resolve():
        raise UsageError("the output file is the input file", "write the answers elsewhere: -o answers.jsonl")
    if path.is_dir():
        raise UsageError(f"-o {path} is a directory", f"name a file in it, e.g. -o {path / 'answers.jsonl'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UsageError(f"-o {path}: permission denied", "choose an output file you can write")
        return
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise UsageError(f"-o {path}: {parent} is not a directory", "choose an output path inside a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {path}: cannot create files in {parent} (permission denied)",
                         "choose an output file in a directory you can write")


def is_stream(path: Path) -> bool:
    """A pipe, FIFO, terminal or other non-regular file that exists (e.g. /dev/stdout)."""
    return path.exists() and not path.is_file() and not path.is_dir()


def open_output(path: Path, input_path: Path) -> tuple[Output, Existing]:
    """Lock the output, read what an earlier run answered, drop its errors and torn tail."""
    check_output(path, input_path)
    if is_stream(path):
        return StreamOutput(path), Existing()
    output = Output(path)
    try:
        existing = read_existing(path)
        if existing.rewrite:
            output.replace(existing.done.values())
    except BaseException:
        output.close()
        raise
    return output, existing


def pending(items: list[Request | BadLine], existing: Existing) -> Iterator[Request | BadLine]:
    """The input items whose ids have no successful record yet."""
    return (item for item in items if id_key(item.id) not in existing.done)
