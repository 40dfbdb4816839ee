"""`qvl launch` -> `qvl list` -> `qvl chat` -> `qvl terminate` through the CLI, with real
background server processes (tiny checkpoint, CPU, loopback), and the failure paths."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import time

import httpx
import openai
import pytest

from conftest import run_qvl
from media_fixtures import make_image
from serverutil import server_pids


def _launch(*args: str, timeout: float = 180):
    return run_qvl("launch", "--device", "cpu", *args, timeout=timeout)


def _listed() -> list[dict]:
    result = run_qvl("list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_launch_list_chat_terminate(tiny_model, tmp_path):
    home = os.environ["QVL_HOME"]
    image = make_image(tmp_path / "photo.png", 64, 48)
    launched = _launch("--model-path", str(tiny_model), "--model-uid", "e2e", "--max-queue", "1", "--json")
    assert launched.returncode == 0, launched.stderr
    entry = json.loads(launched.stdout)
    try:
        assert server_pids(home) == [entry["pid"]]
        assert entry["endpoint"].startswith("http://127.0.0.1:") and entry["endpoint"].endswith("/v1")
        listed = _listed()
        assert [(e["uid"], e["pid"], e["state"], e["endpoint"]) for e in listed] == [
            ("e2e", entry["pid"], "running", entry["endpoint"])]
        assert listed[0]["model_path"] == str(tiny_model) and listed[0]["device"] == "cpu"

        # No spec flags and one launched model: chat talks to it over HTTP.
        chat = run_qvl("chat", "--image", str(image), "--max-tokens", "8", "--temperature", "0", "--json",
                       "Describe this image.")
        assert chat.returncode == 0, chat.stderr
        answer = json.loads(chat.stdout)
        assert answer["model"]["endpoint"] == entry["endpoint"] and answer["usage"]["prompt_tokens"] > 6
        client = openai.OpenAI(base_url=entry["endpoint"], api_key="none", max_retries=0)
        uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        direct = client.chat.completions.create(model="e2e", max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": "Describe this image."}]}])
        assert answer["text"] == direct.choices[0].message.content
        assert answer["usage"]["prompt_tokens"] == direct.usage.prompt_tokens
        plain = run_qvl("chat", "--model-uid", "e2e", "--max-tokens", "8", "--temperature", "0",
                        "--image", str(image), "Describe this image.")
        assert plain.returncode == 0 and plain.stdout.strip() == answer["text"].strip()

        # Started without --allow-local-media: a request cannot name the server's files.
        refused = httpx.post(f"{entry['endpoint']}/chat/completions", timeout=30, json={
            "model": "e2e", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"file://{image}"}}]}]})
        assert refused.status_code == 400 and "local files are not allowed" in refused.text

        # --max-queue 1: while one request holds the model, the next is told to come back.
        body = {"model": "e2e", "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 20000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{entry['endpoint']}/chat/completions", json=body, timeout=30) as held:
            lines = held.iter_lines()  # keep it: a dropped iterator closes the connection
            next(lines)
            with pytest.raises(openai.RateLimitError) as busy:
                client.chat.completions.create(model="e2e", messages=[{"role": "user", "content": "hi"}])
            assert busy.value.response.headers.get("retry-after") == "1"
        # Its place is free once the server has seen the disconnect (a client honouring
        # Retry-After gets in at once).
        for _ in range(50):
            try:
                assert client.chat.completions.create(model="e2e", max_tokens=2, timeout=30,
                                                      messages=[{"role": "user", "content": "hi"}]).choices
                break
            except openai.RateLimitError:
                time.sleep(0.05)
        else:
            pytest.fail("the held request's place was not given back")

        # The same UID again is refused at once, and the running one is untouched.
        again = _launch("--model-path", str(tiny_model), "--model-uid", "e2e", timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
        assert "qvl terminate e2e" in again.stderr
        assert server_pids(home) == [entry["pid"]]
    finally:
        stopped = run_qvl("terminate", "--model-uid", "e2e")  # Xinference's spelling; the positional works too
    assert stopped.returncode == 0, stopped.stderr
    assert "e2e: stopped" in stopped.stderr
    assert server_pids(home) == []
    assert _listed() == []
    assert not list((tmp_path.parent).glob("**/run/e2e.json"))


def test_launch_failure_exits_with_the_reason_and_leaves_nothing(tiny_model, tmp_path):
    home = os.environ["QVL_HOME"]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # truncated: the header promises more
    result = _launch("--model-path", str(broken))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "load" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert server_pids(home) == [] and _listed() == []


def test_a_port_in_use_is_a_clear_error(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = _launch("--model-path", str(tiny_model), "--port", str(port), timeout=60)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr and "--port" in result.stderr
    assert _listed() == []


@pytest.mark.parametrize("args, words", [
    (["--device", "tpu"], "unknown --device"),
    (["--model-uid", "bad/uid"], "invalid model UID"),
    (["--allow-local-media", "/no/such/folder"], "not a folder"),
])
def test_bad_launch_flags_fail_before_starting_anything(tiny_model, args, words):
    result = run_qvl("launch", "--model-path", str(tiny_model), *args, timeout=60)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert _listed() == []


def test_terminate_and_list_with_nothing_running():
    assert _listed() == []
    unknown = run_qvl("terminate", "nope")
    assert unknown.returncode == 1 and "no running model with UID 'nope'" in unknown.stderr
    assert run_qvl("terminate", "--all").returncode == 0
    both = run_qvl("terminate", "x", "--all")
    assert both.returncode == 2
    for flag in ("--model-uid", "-u"):
        by_flag = run_qvl("terminate", flag, "nope")
        assert by_flag.returncode == 1 and "no running model with UID 'nope'" in by_flag.stderr
    two = run_qvl("terminate", "x", "-u", "y")
    assert two.returncode == 2 and "two model UIDs" in two.stderr


def test_wildcard_host_without_key_warns(tiny_model):
    result = run_qvl("launch", "--model-path", str(tiny_model), "--host", "0.0.0.0", "--device", "tpu")
    assert "without an API key" in result.stderr


def test_a_spec_that_does_not_fit_is_refused_before_any_download():
    result = run_qvl("launch", "-s", "72", env={"QVL_FAKE_GPUS": "24GiB"}, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "--force" in result.stderr and "download" not in result.stderr.lower()
    assert _listed() == []
