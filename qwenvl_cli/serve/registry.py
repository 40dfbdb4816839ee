"""Running models launched by `qvl launch`: one JSON file per model UID under ``$QVL_HOME/run/``.

An entry records where a model is served (uid, pid, host, port), what it is (spec, model path)
and since when. It never holds the API key: only whether one is required. Entries whose
process is gone (or whose pid now belongs to another program) are removed when read, so a
crash or a `kill -9` never leaves a ghost in `qvl list`. Writes are atomic (temporary file +
rename); :func:`reserve` creates the file exclusively, so two launches of one UID cannot both
succeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from qwenvl_cli import settings
from qwenvl_cli.errors import ServerError, UsageError, did_you_mean

STARTING, RUNNING = "starting", "running"
_UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Entry:
    uid: str
    pid: int
    host: str = "127.0.0.1"
    port: int = 0
    state: str = STARTING  # starting | running
    spec: dict[str, Any] | None = None  # ResolvedSpec.to_dict() subset; None for --model-path
    model_path: str = ""
    started_at: float = field(default_factory=time.time)
    api_key: bool = False  # whether requests need `Authorization: Bearer KEY`
    pid_start: str | None = None  # the process's start time (Linux), to detect a reused pid
    log_file: str | None = None
    gpu_memory_bytes: int | None = None  # allocated by the model after loading, when on GPUs
    device: str | None = None
    foreground: bool = False
    cluster: str | None = None  # a Ray Serve application on this cluster address (serve/cluster.py)
    route: str = ""  # the application's route prefix there, e.g. "/my-model"

    @property
    def endpoint(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1`` (loopback for a wildcard bind)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{self.route}/v1"

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.started_at)

    def spec_label(self) -> str:
        s = self.spec or {}
        if not s:
            return "-"
        quant = s.get("quantization")
        quant = "" if not quant or quant == "none" else f" {quant}"
        return f"{s.get('model_name')} {s.get('size_in_billions')}B {s.get('model_format')}{quant}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "endpoint": self.endpoint, "uptime_seconds": round(self.uptime, 1)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entry:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --- processes --------------------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    rest = stat.rsplit(")", 1)[-1].split()
    return rest[19] if len(rest) > 19 else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if ``start`` is known, is the same process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        if state in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    return start is None or process_start(pid) in (None, start)


def alive(entry: Entry) -> bool:
    """A cluster deployment lives on the cluster, not in a local process: it stays listed
    until `qvl terminate` removes it (`qvl list` asks the cluster for its health)."""
    return entry.cluster is not None or pid_alive(entry.pid, entry.pid_start)


# --- files ------------------------------------------------------------------------------


def check_uid(uid: str) -> str:
    if not _UID_RE.match(uid or ""):
        raise UsageError(f"invalid model UID {uid!r}",
                         "use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit)")
    return uid


def _path(uid: str) -> Path:
    return settings.run_dir() / f"{check_uid(uid)}.json"


def log_path(uid: str) -> Path:
    return settings.run_dir() / f"{check_uid(uid)}.log"


def write(entry: Entry) -> Entry:
    """Write (or replace) an entry atomically."""
    path = _path(entry.uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.uid}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(entry), handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return entry


def _read(path: Path) -> Entry | None:
    try:
        return Entry.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remove(uid: str, pid: int | None = None) -> None:
    """Remove the entry of ``uid`` (only if it still belongs to ``pid``, when given)."""
    path = _path(uid)
    if pid is not None:
        entry = _read(path)
        if entry is not None and entry.pid != pid:
            return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def entries() -> list[Entry]:
    """Every live entry, oldest first; entries of dead processes are deleted on the way."""
    folder = settings.run_dir()
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        entry = _read(path)
        if entry is None:
            # A file being written is renamed into place whole, so this is garbage.
            if time.time() - _mtime(path) > 60:
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        if alive(entry):
            out.append(entry)
        else:
            remove(entry.uid, entry.pid)
    return sorted(out, key=lambda e: e.started_at)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def get(uid: str) -> Entry | None:
    entry = _read(_path(uid))
    if entry is None or not alive(entry):
        if entry is not None:
            remove(uid, entry.pid)
        return None
    return entry


def find(uid: str) -> Entry:
    """The live entry of ``uid``, or ServerError naming the running ones."""
    entry = get(uid)
    if entry is not None:
        return entry
    running = [e.uid for e in entries()]
    listed = ", ".join(running) if running else "none"
    raise ServerError(f"no running model with UID {uid!r}{did_you_mean(uid, running)}",
                      f"running: {listed} (see `qvl list`)")


def reserve(uid: str, pid: int | None = None, **fields_: Any) -> Entry:
    """Create the entry of ``uid`` in state 'starting', or raise when that UID is taken."""
    path = _path(uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        entry = Entry(uid=uid, pid=pid or os.getpid(), pid_start=process_start(pid or os.getpid()),
                      **fields_)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            existing = get(uid)  # removes it when its process is gone
            if existing is None:
                continue
            raise ServerError(
                f"a model with UID {uid!r} is already {existing.state} "
                f"(pid {existing.pid}, {existing.endpoint})",
                f"use it, stop it with `qvl terminate {uid}`, or pass --model-uid OTHER") from None
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(entry), handle, indent=2)
        return entry
    raise ServerError(f"cannot reserve the model UID {uid!r} in {path.parent}", "try again")


def update(entry: Entry, **changes: Any) -> Entry:
    return write(replace(entry, **changes))
