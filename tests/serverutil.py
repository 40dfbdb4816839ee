"""Helpers for tests that start real qvl server processes: isolated environments, waiting for
the launch's JSON, finding leftover server processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import _CLEARED, qvl_env


def isolated_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A qvl subprocess environment with every home and cache inside ``root`` (for fixtures
    wider than one test, which the autouse isolated_env fixture does not cover)."""
    env = qvl_env()
    for name in _CLEARED:
        env.pop(name, None)
    env.update(HOME=str(root), QVL_HOME=str(root / "qvl"), HF_HOME=str(root / "hf"),
               MODELSCOPE_CACHE=str(root / "modelscope"), XDG_CACHE_HOME=str(root / "cache"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.update(extra or {})
    return env


def server_pids(qvl_home: str | Path) -> list[int]:
    """Live (non-zombie) qvl processes whose QVL_HOME is ``qvl_home``."""
    marker = f"QVL_HOME={qvl_home}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if b"qwenvl_cli" in cmdline and state not in ("Z", "X") and marker in environ:
            pids.append(int(proc.name))
    return pids


class Foreground:
    """`qvl launch --foreground --json ...` as a child process; ``entry`` once it is ready."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.stderr = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "qwenvl_cli", "launch", "--foreground", "--json", *args],
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.decode())

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return json.loads("".join(self.lines))
            except ValueError:
                pass
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"the server did not start: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self.stderr.close()
