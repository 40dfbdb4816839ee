"""A real local Ray cluster for the tests: a head on 127.0.0.2 and workers on 127.0.0.3.., each
`ray start --block` in its own session, stopped by those sessions' PIDs (never `ray stop`, which
would end every Ray process on the host).

Ray's gRPC servers bind 0.0.0.0 whatever --node-ip-address says, so the cluster tests run in a
network namespace that has only loopback (`.ci/ray` runs pytest under `unshare --net`);
:func:`isolated` says whether this process is in one, and the tests skip otherwise.

    python tests/raycluster.py start [WORKERS]   # prints the state as JSON
    python tests/raycluster.py stop STATE.json
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_IP = "127.0.0.2"
OBJECT_STORE = 80 * 1024 * 1024  # the least Ray accepts; the tests move kilobytes


def isolated() -> bool:
    """True when every network interface of this namespace is loopback."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]  # this process's namespace
    except OSError:
        return False
    return [line.split(":", 1)[0].strip() for line in lines] == ["lo"]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def free_port(host: str = HEAD_IP) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra or {})
    return env


def start(workers: int = 1, cpus: int = 1, env: dict[str, str] | None = None, timeout: float = 90,
          head_cpus: int | None = None) -> dict:
    t0 = time.perf_counter()
    temp_dir = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # short: unix socket paths < 108 chars
    port = free_port()
    common = ["--num-cpus", str(cpus if head_cpus is None else head_cpus), "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE),
              "--disable-usage-stats", "--block", "--temp-dir", temp_dir, "--include-log-monitor", "false"]
    state = {"address": f"{HEAD_IP}:{port}", "procs": [], "temp_dir": temp_dir,
             "serve_port": free_port()}
    # Ray 2.60 turns token authentication on for a new head and keeps the token in
    # ~/.ray/auth_token, shared by every cluster of this user: give this one its own.
    state["env"] = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    full_env = node_env({**(env or {}), **state["env"]})

    def spawn(cmd: list[str], name: str) -> None:
        log = open(os.path.join(temp_dir, f"{name}.log"), "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=for_node(full_env, name),
                                start_new_session=True)
        state["procs"].append({"name": name, "pid": proc.pid})

    try:
        spawn([ray_bin(), "start", "--head", "--node-ip-address", HEAD_IP, "--port", str(port),
               "--include-dashboard", "false", "--ray-client-server-port", str(free_port()), *common], "head")
        wait_nodes(state, 1, timeout)
        for i in range(workers):
            add_worker(state, i, cpus, full_env)
        wait_nodes(state, 1 + workers, timeout)
        state["full_env"] = full_env
    except BaseException:
        stop(state)
        raise
    state["seconds"] = round(time.perf_counter() - t0, 1)
    return state


def for_node(env: dict[str, str], name: str) -> dict[str, str]:
    """``{node}`` in a value becomes the node's name (head, worker0, ...): per-node folders."""
    return {k: v.replace("{node}", name) for k, v in env.items()}


def add_worker(state: dict, i: int, cpus: int, env: dict[str, str]) -> None:
    cmd = [ray_bin(), "start", "--address", state["address"], "--node-ip-address", f"127.0.0.{3 + i}",
           "--num-cpus", str(cpus), "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE),
           "--disable-usage-stats", "--block", "--temp-dir", state["temp_dir"], "--include-log-monitor", "false"]
    log = open(os.path.join(state["temp_dir"], f"worker{i}.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=for_node(env, f"worker{i}"),
                            start_new_session=True)
    state["procs"].append({"name": f"worker{i}", "pid": proc.pid})


def wait_nodes(state: dict, n: int, timeout: float) -> None:
    """Poll the GCS from a subprocess (so the caller stays unconnected) until n nodes are alive."""
    deadline = time.time() + timeout
    code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    while time.time() < deadline:
        r = subprocess.run([sys.executable, "-c", code, state["address"]], capture_output=True, text=True,
                           env=node_env(state["env"]), timeout=60)
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{n} nodes not alive at {state['address']} after {timeout}s")


def session_pids(sid: int) -> list[int]:
    """Every live process of a node's session (Ray's workers get their own process group but
    stay in the session `ray start` got from start_new_session)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "--sid", str(sid)], capture_output=True, text=True).stdout
    return [int(f[0]) for f in (line.split() for line in out.splitlines()) if f and "Z" not in f[1]]


def stop(state: dict, timeout: float = 20) -> None:
    """SIGTERM every process of each node's session (workers first), SIGKILL what is left."""
    for proc in reversed(state["procs"]):
        for pid in session_pids(proc["pid"]):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + timeout
    for proc in state["procs"]:
        while time.time() < deadline and session_pids(proc["pid"]):
            time.sleep(0.2)
        for pid in session_pids(proc["pid"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    if sys.argv[1] == "start":
        print(json.dumps(start(int(sys.argv[2]) if len(sys.argv) > 2 else 1)))
    else:
        stop(json.loads(Path(sys.argv[2]).read_text()))
