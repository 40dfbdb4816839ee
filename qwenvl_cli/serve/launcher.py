"""`qvl launch` and `qvl terminate`: start a server process holding a model, stop it.

``plan(...)`` turns the command line into a :class:`~qwenvl_cli.serve.api.ServerConfig` (spec
resolution with the fit check, download, UID, port check); ``start(config)`` reserves the UID,
starts ``python -m qwenvl_cli.serve.server`` in its own session, relays its status events to the
terminal and returns the registry entry once the model answers, or raises the child's reason
after making sure nothing is left running. ``terminate(entry)`` stops one: SIGTERM, then
SIGKILL after a timeout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwenvl_cli import render, settings
from qwenvl_cli.catalogue.resolve import SpecQuery
from qwenvl_cli.errors import QvlError, ServerError
from qwenvl_cli.serve import registry
from qwenvl_cli.serve.api import ServerConfig

KEEP_SPEC = ("model_name", "model_engine", "model_format", "size_in_billions", "quantization",
             "hub", "model_id", "revision")


@dataclass(frozen=True)
class ModelChoice:
    """What `launch` serves: a folder, the spec it came from (if any), its default UID."""

    path: Path
    spec: Any  # ResolvedSpec | None
    uid: str
    aliases: tuple[str, ...]
    model_format: str
    gpus: tuple[int, ...] | None = None  # where the fit check placed it (-s auto / no --gpu-idx)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def folder_uid(path: Path) -> str:
    """A UID from a folder name: 'Qwen2-VL-2B-Instruct' stays, odd characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.name).strip("-.") or "model"
    return name[:128]


def model_format_of(path: Path) -> str:
    """pytorch, awq or gptq, from config.json's quantization_config."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "pytorch"
    method = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
    return method if method in ("awq", "gptq") else "pytorch"


def choose_model(query: SpecQuery, model_path: str | Path | None, workload: Any,
                 gpu_idx: str | None, force: bool, uid: str | None = None, revision: str | None = None,
                 offline: bool = False, quiet: bool = False, device: str = "auto") -> ModelChoice:
    """Check the spec (fit.preflight.check_spec: ``-s auto``, the AWQ / GPTQ backend, the fit
    refusal), check the UID is free, then get the files (nothing is downloaded for a UID
    that is already running)."""
    from qwenvl_cli.fit.preflight import check_spec
    from qwenvl_cli.hub import download as hub

    result = check_spec(query, gpu_idx=gpu_idx, device=device, model_path=model_path, force=force,
                        workload=workload, quiet=quiet, announce=True,
                        need_backend=query.model_engine != "vllm")  # vLLM has its own AWQ / GPTQ kernels
    spec = result.spec if result is not None else None
    if model_path is not None:
        local = hub.local_model_from_path(model_path, spec)
        uid = _free_uid(uid or (spec.uid if spec is not None else folder_uid(local.path)))
        aliases = (spec.model_id,) if spec is not None else (local.path.name,)
        return ModelChoice(local.path, spec, uid, aliases, spec.model_format if spec else model_format_of(local.path))
    uid = _free_uid(uid or spec.uid)
    local = hub.ensure_local(spec, revision=revision, offline=True if offline else None, quiet=quiet)
    aliases = tuple(dict.fromkeys(s.model_id for s in spec.sources))
    gpus = tuple(g.index for g in result.placement.gpus) if result.placement else None
    return ModelChoice(local.path, spec, uid, aliases, spec.model_format, gpus)


def check_cluster_flags(cluster: str | None, replicas: int, autoscale: str | None, cache_dir: str | None) -> None:
    """With --cluster, Ray must be installed (the first check); without it, the cluster flags
    do not apply."""
    from qwenvl_cli.errors import UsageError
    from qwenvl_cli.fit.packages import require_ray

    if cluster:
        require_ray()
    elif replicas != 1 or autoscale or cache_dir:
        raise UsageError("--replicas, --autoscale and --cache-dir are for a Ray cluster",
                         "add --cluster HOST:PORT (see docs/cluster.md), or drop them")


def cluster_config(query: SpecQuery, model_path: str | None, engine: dict[str, Any], uid: str | None,
                   host: str, port: int | None, **server_options: Any) -> tuple[ServerConfig, Any]:
    """`launch --cluster`: the ServerConfig and the spec, resolved here without a fit check or a
    download (each replica checks its node's GPUs and downloads there: serve/cluster.py).
    ``model_path`` stays "" unless --model-path names a folder every node has."""
    from qwenvl_cli.fit.preflight import check_spec

    result = check_spec(query, device=engine.get("device", "auto"), model_path=model_path, force=True,
                        need_backend=False, quiet=True)
    spec = result.spec if result is not None else None
    folder = Path(model_path).expanduser().resolve() if model_path else Path(".")
    uid = _free_uid(uid or (spec.uid if spec is not None else folder_uid(folder)))
    aliases = tuple(dict.fromkeys(s.model_id for s in spec.sources)) if spec is not None else (folder.name,)
    fmt = spec.model_format if spec is not None else model_format_of(folder)
    config = server_config(ModelChoice(folder, spec, uid, aliases, fmt), engine, host, port or 8000, **server_options)
    return replace(config, model_path=str(folder) if model_path else "", log_file=None), spec


def _free_uid(uid: str) -> str:
    existing = registry.get(registry.check_uid(uid))
    if existing is not None:
        raise ServerError(f"a model with UID {uid!r} is already {existing.state} (pid {existing.pid}, "
                          f"{existing.endpoint})",
                          f"use it, stop it with `qvl terminate {uid}`, or pass --model-uid OTHER")
    return uid


def check_port_free(host: str, port: int) -> None:
    """Fail early (before a download) when --port is taken; the server binds it again later."""
    from qwenvl_cli.serve.server import bind

    if port:
        bind(host, port).close()


def spec_summary(spec: Any) -> dict[str, Any] | None:
    if spec is None:
        return None
    data = spec.to_dict()
    return {k: data[k] for k in KEEP_SPEC}


# --- background start -----------------------------------------------------------------------


def _child_env(config: ServerConfig, api_key: str | None, status_fd: int) -> dict[str, str]:
    import qwenvl_cli

    env = dict(os.environ)
    package_parent = str(Path(qwenvl_cli.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    env.update(QVL_SERVER_CONFIG=config.to_json(), QVL_STATUS_FD=str(status_fd), PYTHONUNBUFFERED="1")
    env.pop("QVL_API_KEY", None)
    if api_key:
        env["QVL_API_KEY"] = api_key  # the environment, not the command line: `ps` shows that
    return env


def spawn(config: ServerConfig, api_key: str | None) -> tuple[subprocess.Popen, int]:
    """Start the server process in its own session; returns it and the read end of its status pipe."""
    read_fd, write_fd = os.pipe()
    log_file = Path(config.log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qwenvl_cli.serve.server"], stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, env=_child_env(config, api_key, write_fd), pass_fds=(write_fd,),
                start_new_session=True, cwd=str(log_file.parent))
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return proc, read_fd


def _log_tail(path: str | None, lines: int = 1) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines() if path else []
    except OSError:
        return ""
    useful = [t for t in text if t.strip() and not t.startswith(" ")]
    return " | ".join(useful[-lines:])


class _Events:
    """JSON-line events from the server process's status pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.closed = False

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        if self.closed:
            time.sleep(timeout)
            return []
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.fd, 65536)
        if not data:
            self.closed = True
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def _failure(event: dict[str, Any] | None, proc: subprocess.Popen | None, config: ServerConfig) -> QvlError:
    if event is not None:
        err = ServerError(event.get("message") or "the server failed", event.get("hint"))
        err.exit_code = int(event.get("exit_code") or 1)
        return err
    tail = _log_tail(config.log_file, 1)
    reason = f": {tail}" if tail else ""
    return ServerError(f"the server process exited with code {proc.returncode} while starting{reason}",
                       f"see the log: {config.log_file}")


def wait_ready(proc: subprocess.Popen, read_fd: int, config: ServerConfig, quiet: bool = False,
               timeout: float | None = None) -> dict[str, Any]:
    """Relay the child's status until its ``ready`` event; raise its error otherwise."""
    events, started, message = _Events(read_fd), time.monotonic(), "starting the server"
    show = render.stderr_console()
    spinner = show.status(message) if show.is_terminal and not quiet else contextlib.nullcontext()
    with spinner as status:
        while True:
            for event in events.poll(0.2):
                kind = event.get("event")
                if kind == "ready":
                    return event
                if kind == "error":
                    raise _failure(event, proc, config)
                message = event.get("message") or (f"listening on port {event['port']}"
                                                   if kind == "bound" else message)
                if status is None and not quiet:
                    render.status(message)
            if status is not None:
                status.update(f"{message} ({time.monotonic() - started:.0f} s)")
            if proc.poll() is not None and events.closed:
                raise _failure(None, proc, config)
            if timeout is not None and time.monotonic() - started > timeout:
                raise ServerError(f"the server did not become ready within {timeout:g} s",
                                  f"see the log: {config.log_file}")


def start(config: ServerConfig, api_key: str | None = None, quiet: bool = False,
          timeout: float | None = None) -> registry.Entry:
    """Reserve the UID, start the server process, wait until it answers; clean up on failure."""
    registry.reserve(config.uid, host=config.host, port=config.port, spec=config.spec,
                     model_path=config.model_path, api_key=bool(api_key), log_file=config.log_file)
    proc = None
    try:
        proc, read_fd = spawn(config, api_key)
        try:
            wait_ready(proc, read_fd, config, quiet, timeout)
        finally:
            os.close(read_fd)
        entry = registry.get(config.uid)
        if entry is None or entry.pid != proc.pid:
            raise ServerError("the server process stopped right after starting", f"see the log: {config.log_file}")
        return entry
    except BaseException:
        if proc is not None:
            _stop_process(proc.pid, group=True, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)
        registry.remove(config.uid)
        raise


def run_foreground(config: ServerConfig, api_key: str | None, on_ready: Any) -> int:
    """`launch --foreground`: serve in this process until SIGINT / SIGTERM (0 after a clean stop)."""
    from qwenvl_cli.serve import server

    registry.reserve(config.uid, host=config.host, port=config.port, spec=config.spec,
                     model_path=config.model_path, api_key=bool(api_key), foreground=True)
    failure: dict[str, Any] = {}

    def announce(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready":
            on_ready(registry.get(config.uid))
        elif kind == "error":
            failure.update(event)
        elif kind == "status":
            render.status(event["message"])

    try:
        code = server.serve(config, api_key, announce)
    finally:
        registry.remove(config.uid, os.getpid())
    if failure:
        raise _failure(failure, None, config)
    return code


# --- stop -------------------------------------------------------------------------------------


def _signal(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _wait_gone(pid: int, start: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not registry.pid_alive(pid, start):
            return True
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
        time.sleep(0.05)
    return not registry.pid_alive(pid, start)


def _stop_process(pid: int, group: bool, timeout: float, start: str | None = None) -> str:
    _signal(pid, signal.SIGTERM, group)
    if _wait_gone(pid, start, timeout):
        return "stopped"
    _signal(pid, signal.SIGKILL, group)
    if _wait_gone(pid, start, 5):
        return "killed"
    raise ServerError(f"process {pid} did not stop, even after SIGKILL", f"check it with `ps -p {pid}`")


def terminate(entry: registry.Entry, timeout: float = 10.0) -> str:
    """Stop a launched model: SIGTERM, then SIGKILL after ``timeout`` s. 'stopped' or 'killed'."""
    if entry.cluster is not None:
        from qwenvl_cli.serve import cluster

        return cluster.terminate(entry)
    if entry.pid == os.getpid():
        raise ServerError("refusing to terminate this very process", "run terminate from another shell")
    # A background server leads its own session: signal the group so that nothing it
    # started outlives it. A foreground one may share a group with a shell pipeline.
    outcome = _stop_process(entry.pid, group=not entry.foreground, timeout=timeout, start=entry.pid_start)
    registry.remove(entry.uid, entry.pid)
    return outcome


def warn_exposed(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        render.warn(f"binding {host} without an API key: anyone who can reach this machine can use "
                    "the model; pass --api-key KEY (or set QVL_API_KEY)")


def server_config(choice: ModelChoice, engine: dict[str, Any], host: str, port: int | None,
                  **options: Any) -> ServerConfig:
    local = options.pop("allow_local_media", None)
    if local is not None:
        folder = Path(local).expanduser()
        if not folder.is_dir():
            from qwenvl_cli.errors import UsageError

            raise UsageError(f"--allow-local-media {local}: not a folder", "give an existing folder")
        local = str(folder.resolve())
    engine = {**engine, "model_format": choice.model_format}
    if choice.gpus and not (engine.get("gpu_idx") or engine.get("n_gpu")) and engine.get("device") != "cpu":
        engine["gpu_idx"] = list(choice.gpus)  # the GPUs the fit check found room on
    return ServerConfig(uid=choice.uid, model_path=str(choice.path), aliases=choice.aliases, host=host,
                        port=port or 0, engine=engine,
                        spec=spec_summary(choice.spec), allow_local_media=local,
                        log_file=str(registry.log_path(choice.uid)), **options)


def default_api_key(given: str | None) -> str | None:
    return given or settings.api_key()


def examples(entry: registry.Entry) -> str:
    """Ready-to-paste curl and Python `openai` examples for a running model."""
    auth = ' -H "Authorization: Bearer $QVL_API_KEY"' if entry.api_key else ""
    key = 'os.environ["QVL_API_KEY"]' if entry.api_key else '"EMPTY"'
    return f"""curl {entry.endpoint}/chat/completions -H "Content-Type: application/json"{auth} \\
  -d '{{"model": "{entry.uid}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

import base64, os
from openai import OpenAI
client = OpenAI(base_url="{entry.endpoint}", api_key={key})
image = "data:image/jpeg;base64," + base64.b64encode(open("photo.jpg", "rb").read()).decode()
answer = client.chat.completions.create(model="{entry.uid}", messages=[{{"role": "user", "content": [
    {{"type": "image_url", "image_url": {{"url": image}}}},
    {{"type": "text", "text": "What is in this picture?"}}]}}])
print(answer.choices[0].message.content)"""


def summary(entry: registry.Entry) -> list[tuple[str, str]]:
    return [("model uid", entry.uid), ("endpoint", entry.endpoint), ("spec", entry.spec_label()),
            ("model path", entry.model_path), ("pid", str(entry.pid)),
            ("api key", "required" if entry.api_key else "none"),
            ("log", entry.log_file or "-"), ("chat", f"qvl chat --model-uid {entry.uid}"),
            ("stop", f"qvl terminate {entry.uid}")]


def listing(entry: registry.Entry) -> dict[str, Any]:
    """`qvl list --json`'s record: the registry entry, plus the replicas' health for a
    deployment on a Ray cluster (asked of the cluster; ``unreachable`` when it cannot be)."""
    data = entry.to_dict()
    if entry.cluster is not None:
        from qwenvl_cli.serve import cluster

        try:
            data["health"] = cluster.health(entry)
        except QvlError as exc:
            data["health"] = {"status": "UNREACHABLE", "error": exc.message, "replicas": []}
    return data


def rows(entries: list[registry.Entry]) -> list[list[str]]:
    """`qvl list` table rows."""
    from qwenvl_cli.hub.progress import human_seconds

    out = []
    for e in entries:
        state, pid = e.state, str(e.pid)
        if e.cluster is not None:
            health = listing(e)["health"]
            alive = sum(1 for r in health["replicas"] if r["state"] == "ALIVE")
            state, pid = f"{health['status'].lower()}, {alive} replica(s) alive", f"ray {e.cluster}"
        out.append([e.uid, e.spec_label(), e.endpoint, pid, human_seconds(e.uptime), state,
                    "-" if e.gpu_memory_bytes is None else f"{e.gpu_memory_bytes / 2**30:.1f} GiB"])
    return out
