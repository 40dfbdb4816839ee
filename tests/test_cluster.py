"""`--cluster`: qvl on a real local Ray cluster of two nodes (head 127.0.0.2, worker 127.0.0.3).

The cluster tests need Ray (`qvl[ray]`) and a network namespace with only loopback, because
Ray's gRPC servers bind 0.0.0.0: `.ci/ray` runs them under `unshare --net`; elsewhere they
skip. The cluster is started once for the module and stopped by the PIDs it started. The
model is the tiny checkpoint, which each node's replica downloads from a loopback hub into
its own cache. The first test needs neither Ray nor the namespace.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import qvl_env, run_qvl
from hubfixtures import HF_ID, MS_ID, PIN

import raycluster

NO_RAY = ("import importlib.abc, sys\n"
          "class Block(importlib.abc.MetaPathFinder):\n"
          "    def find_spec(self, name, path=None, target=None):\n"
          "        if name.split('.')[0] in ('ray', 'pyarrow', 'aiohttp'): raise ModuleNotFoundError(name)\n"
          "sys.meta_path.insert(0, Block())\n"
          "import importlib.util\n"
          "real = importlib.util.find_spec\n"
          "importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] in ('ray', 'pyarrow', 'aiohttp') "
          "else real(n, *a)\n"
          "from qwenvl_cli.cli.app import main\n"
          "sys.argv = ['qvl'] + sys.argv[1:]\n"
          "sys.exit(main())\n")


@pytest.mark.parametrize("args", [
    ["launch", "--cluster", "127.0.0.2:1", "-s", "999", "--replicas", "2"],
    ["batch", "missing.jsonl", "-o", "out.jsonl", "--cluster", "127.0.0.2:1", "-s", "999"],
])
def test_cluster_without_ray_is_one_line_naming_the_install(args, tmp_path):
    """Without Ray, --cluster stops first: before the bad spec (-s 999) or the missing input."""
    result = subprocess.run([sys.executable, "-c", NO_RAY, *args], env=qvl_env(), capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and 'pip install "qvl[ray]"' in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "999" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


needs_cluster = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or not raycluster.isolated(),
    reason="needs qvl[ray] and a loopback-only network namespace, as Ray binds 0.0.0.0 "
           "(bash .ci/ray VENV installs Ray and runs these under unshare --net)")


@pytest.fixture(scope="module")
def hub(tiny_model):
    from hubserver import HubServer

    server = HubServer().start()
    server.add_repo(tiny_model, hf_id=HF_ID, ms_id=MS_ID, hf_commit=PIN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(hub, tmp_path_factory):
    """Head + one worker, one CPU each; each node's hub cache is its own folder."""
    root = tmp_path_factory.mktemp("nodes")
    env = {"HF_HOME": str(root / "{node}" / "hf"), "QVL_HOME": str(root / "{node}" / "qvl"),
           "HOME": str(root / "{node}"), "MODELSCOPE_CACHE": str(root / "{node}" / "ms"),
           "PYTHONPATH": qvl_env()["PYTHONPATH"]}  # the hub's address is forwarded by qvl (on_cluster)
    state = raycluster.start(workers=1, cpus=1, env=env)
    state["root"] = root
    yield state
    raycluster.stop(state)
    assert not any(raycluster.session_pids(p["pid"]) for p in state["procs"])


@pytest.fixture
def on_cluster(cluster, hub, monkeypatch):
    """This test's qvl commands talk to the cluster, with the hub's address to forward."""
    for name, value in cluster["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # what a replica takes from the launching shell
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    return cluster


def _image_uri() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _alive_actors(address: str) -> list[str]:
    """Ray Serve's live actors (controller, proxies, replicas) on the cluster."""
    code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
            "from ray._private import state;"
            "print([a.get('Name') for a in state.actors().values() if a.get('State') == 'ALIVE' "
            "and (a.get('Name') or '').startswith('SERVE')])")
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                         env=qvl_env(), timeout=90)
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own print of a list of names


def _listed(uid: str) -> dict:
    result = run_qvl("list", "--json", timeout=90)
    assert result.returncode == 0, result.stderr
    return next(e for e in json.loads(result.stdout) if e["uid"] == uid)


@needs_cluster
def test_launch_on_the_cluster_serves_two_replicas_survives_a_dead_one_and_terminates(on_cluster):
    import httpx
    from openai import OpenAI

    port = on_cluster["serve_port"]
    launched = run_qvl("launch", "--cluster", on_cluster["address"], "-s", "2", "--replicas", "2",
                       "--device", "cpu", "--host", "127.0.0.2", "--port", str(port), "--model-uid", "tiny",
                       "--api-key", "sekret", "--json", "--quiet", timeout=400)
    assert launched.returncode == 0, launched.stderr[-3000:]
    entry = json.loads(launched.stdout)
    assert entry["endpoint"] == f"http://127.0.0.2:{port}/tiny/v1" and entry["cluster"] == on_cluster["address"]
    try:
        # each node downloaded into its own cache, through qvl's hub code
        for node in ("head", "worker0"):
            assert list((on_cluster["root"] / node / "hf" / "hub").glob("models--Qwen--Qwen2-VL-2B-Instruct")), node
        client = OpenAI(base_url=entry["endpoint"], api_key="sekret", timeout=60, max_retries=0)
        hi = [{"role": "user", "content": "hi"}]
        answer = client.chat.completions.create(model="tiny", messages=hi, max_tokens=5, temperature=0)
        assert answer.choices[0].message.content and answer.usage.completion_tokens == 5
        stream = client.chat.completions.create(model="tiny", messages=hi, max_tokens=5, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            answer.choices[0].message.content
        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_uri()}},
                                              {"type": "text", "text": "What is it?"}]}]
        seen = client.chat.completions.create(model="tiny", messages=image, max_tokens=3)
        assert seen.usage.prompt_tokens > answer.usage.prompt_tokens  # the image's tokens reached the model
        # qvl's rules hold on the cluster: the key, the model name, local files
        assert httpx.get(f"{entry['endpoint']}/models", timeout=30).status_code == 401
        bad = httpx.post(f"{entry['endpoint']}/chat/completions", headers={"Authorization": "Bearer sekret"},
                         json={"model": "tiny", "messages": [{"role": "user", "content": [
                             {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["message"]
        for _ in range(8):
            client.chat.completions.create(model="tiny", messages=hi, max_tokens=2)
        health = httpx.get(f"{entry['endpoint'].rsplit('/v1', 1)[0]}/health", timeout=30).json()
        served = health["queue"]["served_by"]
        assert len(served) == 2 and all(n >= 1 for n in served.values()), served  # spread over both
        assert {tag.split(":")[0] for tag in served} == {"127.0.0.2", "127.0.0.3"}

        replicas = _listed("tiny")["health"]["replicas"]
        assert sorted(r["node"] for r in replicas) == ["127.0.0.2", "127.0.0.3"]
        victim = next(r for r in replicas if r["node"] == "127.0.0.3")
        results: list = []

        def long_request() -> None:
            started = time.monotonic()
            r = httpx.post(f"{entry['endpoint']}/chat/completions", headers={"Authorization": "Bearer sekret"},
                           json={"model": "tiny", "messages": hi, "max_tokens": 2000, "ignore_eos": True},
                           timeout=90)
            results.append((r.status_code, r.json(), time.monotonic() - started))

        threads = [threading.Thread(target=long_request) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        os.kill(victim["pid"], signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert len(results) == 4
        codes = sorted(code for code, _, _ in results)
        assert set(codes) <= {200, 503} and 503 in codes, results  # the dead replica's: a clean 503
        assert all(body["error"]["type"] == "service_unavailable" for code, body, _ in results if code == 503)
        for _ in range(4):  # the endpoint keeps answering
            assert client.chat.completions.create(model="tiny", messages=hi, max_tokens=2).choices
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # Ray replaces the dead replica
            replicas = _listed("tiny")["health"]["replicas"]
            if len(replicas) == 2 and victim["pid"] not in {r["pid"] for r in replicas}:
                break
            time.sleep(2)
        else:
            raise AssertionError(f"the killed replica was not replaced: {replicas}")
    finally:
        stopped = run_qvl("terminate", "tiny", timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(run_qvl("list", "--json").stdout) == []
    assert _alive_actors(on_cluster["address"]) == []  # nothing left on the cluster


def _requests(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": f"count {i} {'x' * (i % 7)}"}],
                                "max_tokens": 4}) + "\n")
            if i == 100:
                f.write("{not json\n")  # a bad line: an error record, and the run goes on


@needs_cluster
def test_batch_on_the_cluster_matches_local_and_resumes_after_a_kill(on_cluster, tmp_path):
    source = tmp_path / "in.jsonl"
    _requests(source, 200)
    common = ["-s", "2", "--device", "cpu", "--temperature", "0", "--batch-size", "4"]
    local = run_qvl("batch", str(source), "-o", str(tmp_path / "local.jsonl"), *common, "--quiet", timeout=600)
    assert local.returncode == 1, local.stderr[-2000:]  # 1: the bad line's error record

    out = tmp_path / "cluster.jsonl"
    args = [sys.executable, "-m", "qwenvl_cli", "batch", str(source), "-o", str(out), *common,
            "--cluster", on_cluster["address"]]
    first = subprocess.Popen(args, env=qvl_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 40):
        assert first.poll() is None, first.stderr.read()[-2000:]
        time.sleep(0.2)
    first.kill()  # part-way: the driver dies, Ray ends its actors
    first.wait(30)
    done_first = len(out.read_text().splitlines())
    assert 40 <= done_first < 201

    second = subprocess.run(args, env=qvl_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == local.returncode, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 201  # every id exactly once, the bad line's included
    (bad,) = [r for r in records if r["error"] is not None]
    # a line that is not JSON has no id to read: null, and its line number in the error
    assert "not valid JSON" in bad["error"] and "line 102" in bad["error"] and bad["id"] is None
    theirs = {r["id"]: r for r in map(json.loads, (tmp_path / "local.jsonl").read_text().splitlines())}
    answered = {r["id"]: r for r in records if r["error"] is None}
    assert len(answered) == 200
    assert all(answered[k]["text"] == theirs[k]["text"] for k in answered)  # the same greedy answers


def test_cluster_flags_without_cluster_are_refused(tmp_path):
    result = run_qvl("launch", "-s", "2", "--replicas", "2", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Ray cluster" in lines[0] and "--cluster" in lines[1], result.stderr
    assert json.loads(run_qvl("list", "--json").stdout) == []


@needs_cluster
def test_a_launch_whose_replicas_cannot_load_fails_in_one_line_and_leaves_nothing(on_cluster, tmp_path):
    result = run_qvl("launch", "--cluster", on_cluster["address"], "--model-path", str(tmp_path / "nowhere"),
                     "--device", "cpu", "--host", "127.0.0.2", "--port", str(on_cluster["serve_port"]),
                     "--model-uid", "broken", timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    (first,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert first.startswith("error: the replicas failed to start: --model-path ") and "nowhere" in first, \
        result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(run_qvl("list", "--json").stdout) == []
    assert _alive_actors(on_cluster["address"]) == []
