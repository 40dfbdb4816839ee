"""`qvl batch` end to end on the tiny checkpoint (CPU): batched answers equal single ones,
bad lines, duplicate ids, resumption after Ctrl-C and after a crash, and --endpoint
against an OpenAI-compatible loopback server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import qvl_env, run_qvl
from media_fixtures import make_image, make_video

USER = "user"


def user(*parts):
    return [{"role": USER, "content": list(parts)}]


def text(t):
    return {"type": "text", "text": t}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-media")
    return {"red": str(make_image(root / "red.png", 64, 48, (200, 30, 30))),
            "blue": str(make_image(root / "blue.png", 100, 60, (30, 30, 200))),
            "clip": str(make_video(root / "clip.mp4", seconds=2.0, fps=8)),
            "root": root}


def batch(tiny_model, inp, out, *extra, **kw):
    return run_qvl("batch", str(inp), "-o", str(out), "--model-path", str(tiny_model), *extra, **kw)


# --- equivalence ---------------------------------------------------------------------------------


def chat_answer(tiny_model, capsys, prompt, images=(), videos=(), system=None, max_tokens=24,
                repetition_penalty=None):
    """The same request alone through `qvl chat`'s code path (chat_run.run, --json)."""
    from qwenvl_cli.chat import run as chat_run
    from qwenvl_cli.engine.options import EngineOptions
    from qwenvl_cli.generation import GenerationParams

    capsys.readouterr()
    code = chat_run.run(chat_run.ChatCommand(
        prompt=prompt, model_path=str(tiny_model), images=tuple(images), videos=tuple(videos), system=system,
        params=GenerationParams(max_tokens=max_tokens, temperature=0, repetition_penalty=repetition_penalty),
        engine_options=EngineOptions(device="cpu"), json_output=True, quiet=True))
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_batched_answers_equal_single_chat_answers(tiny_model, media, tmp_path, capsys):
    red, blue, clip = media["red"], media["blue"], media["clip"]
    story = "Tell me a long story about a journey over the mountains and the sea, with many turns."
    cases = {  # id -> (input line fields, chat arguments)
        "text": ({"messages": [{"role": "user", "content": "Hello there."}]}, ("Hello there.",)),
        "system": ({"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": story}],
                    "max_tokens": 16}, (story, (), (), "You are terse.", 16)),
        "image-openai": ({"messages": user({"type": "image_url", "image_url": {"url": red}}, text("What is this?"))},
                         ("What is this?", (red,))),
        "image-qwen": ({"messages": user({"type": "image", "image": red}, text("What is this?"))},
                       ("What is this?", (red,))),
        "two-images": ({"messages": user({"type": "image", "image": red}, {"type": "image_url", "image_url": {"url": blue}},
                                         text("Compare these two pictures, in detail."))},
                       ("Compare these two pictures, in detail.", (red, blue))),
        "video": ({"messages": user({"type": "video_url", "video_url": {"url": clip}}, text("Summarise."))},
                  ("Summarise.", (), (clip,))),
        # a batch of their own (another sampler): the penalty must not count the padding
        "penalty-text": ({"messages": [{"role": "user", "content": "Hi."}], "repetition_penalty": 1.5},
                         ("Hi.", (), (), None, 24, 1.5)),
        "penalty-image": ({"messages": user({"type": "image", "image": blue}, text("Tell me all you see here.")),
                           "repetition_penalty": 1.5}, ("Tell me all you see here.", (blue,), (), None, 24, 1.5)),
    }
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": k, **fields} for k, (fields, _) in cases.items()])
    out = tmp_path / "out.jsonl"
    result = batch(tiny_model, inp, out, "--batch-size", "8", "--temperature", "0", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    got = {r["id"]: r for r in read_jsonl(out)}
    assert set(got) == set(cases)
    assert len({r["usage"]["prompt_tokens"] for r in got.values()}) >= 4  # really padded: lengths differ
    assert "8 requests in" in result.stderr and "requests/s" in result.stderr
    for key, (_, args) in cases.items():
        alone = chat_answer(tiny_model, capsys, *args)
        assert got[key]["error"] is None
        assert (got[key]["text"], got[key]["finish_reason"], got[key]["usage"]) == \
            (alone["text"], alone["finish_reason"], alone["usage"]), key
    assert got["image-openai"]["text"] == got["image-qwen"]["text"]
    assert got["system"]["usage"]["completion_tokens"] <= 16


# --- bad lines, duplicate ids ------------------------------------------------------------------------


def test_bad_lines_get_error_records_and_the_rest_is_answered(tiny_model, media, tmp_path):
    broken = media["root"] / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    huge = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(12000))  # > 32,768 tokens
    rows = [
        {"id": "ok", "messages": [{"role": "user", "content": "Hello there."}]},
        '{"id": "torn", "messages": [{"role": "user"',
        {"id": "no-image", "messages": user({"type": "image", "image": str(media["root"] / "nope.png")}, text("?"))},
        {"id": "bad-video", "messages": user({"type": "video", "video": str(broken)}, text("?"))},
        {"id": "too-long", "messages": [{"role": "user", "content": huge}]},
        {"id": "typo", "messages": [{"role": "user", "content": "hi"}], "temprature": 0.5},
        {"id": "img", "messages": user({"type": "image", "image": media["red"]}, text("What is this?"))},
    ]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    result = batch(tiny_model, inp, out, "--max-tokens", "8")
    assert result.returncode == 1, result.stderr
    got = {r["id"]: r for r in read_jsonl(out)}
    assert set(got) == {"ok", None, "no-image", "bad-video", "too-long", "typo", "img"}
    assert got["ok"]["error"] is None and got["img"]["error"] is None and got["img"]["text"]
    assert got[None]["error"].startswith("line 2: not valid JSON")
    assert "nope.png" in got["no-image"]["error"]
    assert "broken.mp4" in got["bad-video"]["error"]
    assert "context length is 32768" in got["too-long"]["error"]
    assert "did you mean temperature?" in got["typo"]["error"]
    assert all(got[k]["text"] is None for k in got if k not in ("ok", "img"))
    assert "5 failed" in result.stderr and "Traceback" not in result.stderr


def test_fail_fast_stops_at_the_first_failure_before_loading(tiny_model, tmp_path):
    rows = [{"id": i, "messages": [{"role": "user", "content": "hi"}]} for i in range(3)] + ["not json"]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    result = batch(tiny_model, inp, out, "--fail-fast")
    assert result.returncode == 1
    assert [r["id"] for r in read_jsonl(out)] == [None]
    assert "--fail-fast" in result.stderr and "loaded" not in result.stderr


def test_lines_that_cannot_run_need_no_model_and_report_no_speed(tiny_model, media, tmp_path):
    """A non-JSON line 2 does not take an explicit id 2; a missing image fails before any model
    loads, on the first run and on a re-run; the summary has no requests/s when nothing ran."""
    rows = [{"id": 2, "messages": user({"type": "image", "image": str(media["root"] / "gone.png")}, text("?"))},
            "not json"]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    for _ in range(2):  # the re-run retries them, still without loading the model
        result = batch(tiny_model, inp, out)
        assert result.returncode == 1, result.stderr
        assert "loaded" not in result.stderr and "requests/s" not in result.stderr
        assert "2 requests: none reached the model; 2 failed" in result.stderr
        got = {r["id"]: r["error"] for r in read_jsonl(out)}
        assert set(got) == {2, None} and "gone.png" in got[2] and got[None].startswith("line 2: not valid JSON")


def test_duplicate_ids_stop_before_anything_runs(tiny_model, tmp_path):
    rows = [{"id": "a", "messages": [{"role": "user", "content": "x"}]},
            {"id": "b", "messages": [{"role": "user", "content": "x"}]},
            {"id": "a", "messages": [{"role": "user", "content": "y"}]}]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    result = batch(tiny_model, inp, out)
    assert result.returncode == 2
    assert 'duplicate ids in the input: id "a" on lines 1, 3' in result.stderr
    assert not out.exists()


# --- interruption and resumption ----------------------------------------------------------------------


def _start(tiny_model, inp, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "qwenvl_cli", "batch", str(inp), "-o", str(out),
                             "--model-path", str(tiny_model), *extra],
                            env=qvl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(out: Path, n: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no output lines in time")


def test_ctrl_c_and_a_crash_lose_nothing_and_resume_without_redoing(tiny_model, tmp_path):
    total = 12
    rows = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"Tell me a story, number {i}."}]}
            for i in range(total)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    args = ("--batch-size", "1", "--max-tokens", "120", "--temperature", "0")

    # 1. Ctrl-C after a few answers: what is done stays written, exit 130
    proc = _start(tiny_model, inp, out, *args)
    _wait_for_lines(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "interrupted" in err and "rerun the same command to resume" in err
    first = read_jsonl(out)  # every line is whole
    assert 3 <= len(first) < total and all(r["error"] is None for r in first)

    # 2. a crash (SIGKILL), and a record torn in mid-write
    proc = _start(tiny_model, inp, out, *args)
    _wait_for_lines(out, len(first) + 2, proc)
    proc.kill()
    proc.communicate()
    with out.open("a") as handle:
        handle.write('{"id": "s99", "text": "half a li')
    second = [json.loads(x) for x in out.read_text().splitlines()[:-1]]
    assert second[:len(first)] == first and len(second) < total

    # 3. the rerun finishes the rest only
    result = run_qvl("batch", str(inp), "-o", str(out), "--model-path", str(tiny_model), *args)
    assert result.returncode == 0, result.stderr
    final = read_jsonl(out)
    ids = [r["id"] for r in final]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every id exactly once
    assert final[:len(second)] == second  # earlier answers kept as they were
    assert f"{total - len(second)} requests in" in result.stderr
    assert f"{len(second)} skipped" in result.stderr

    # 4. and once more: nothing to do
    again = run_qvl("batch", str(inp), "-o", str(out), "--model-path", str(tiny_model), *args)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert read_jsonl(out) == final


# --- --endpoint ---------------------------------------------------------------------------------------

KEY = "batch-key-1"


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """A real `qvl launch --foreground` server on the tiny checkpoint (its own batching on)."""
    from serverutil import Foreground, isolated_env

    root = tmp_path_factory.mktemp("batch-served")
    proc = Foreground(["--model-path", str(tiny_model), "--device", "cpu", "--model-uid", "tiny-vl",
                       "--api-key", KEY, "--max-batch", "4"], isolated_env(root), root / "server.log")
    try:
        yield proc.wait_ready()["endpoint"]
    finally:
        proc.stop(signal.SIGKILL if proc.proc.poll() is None else 0)


def test_endpoint_answers_equal_local_answers(tiny_model, media, tmp_path, served):
    rows = [{"id": "text", "messages": [{"role": "user", "content": "Hello there."}]},
            {"id": "img", "messages": user({"type": "image", "image": media["red"]}, text("What is this?")),
             "max_tokens": 6, "stop": ["zzz"]},
            {"id": "img2", "messages": user({"type": "image_url", "image_url": {"url": media["blue"]}}, text("And this?"))},
            {"id": "video", "messages": user({"type": "video", "video": media["clip"]}, text("Summarise."))},
            {"id": "long", "messages": [{"role": "user", "content": "Tell me a story."}]},
            {"id": "gone", "messages": user({"type": "image", "image": str(media["root"] / "gone.png")}, text("?"))},
            {"id": "remote-url", "messages": user({"type": "image", "image": "http://127.0.0.1:9/x.png"}, text("?"))}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    local_out, remote_out = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    args = ("--temperature", "0", "--max-tokens", "12")
    local = batch(tiny_model, inp, local_out, *args)
    assert local.returncode == 1, local.stderr  # the two unreadable images fail their lines
    remote = run_qvl("batch", str(inp), "-o", str(remote_out), "--endpoint", served, "--api-key", KEY,
                     "--batch-size", "3", *args)
    assert remote.returncode == 1, remote.stderr
    # gone.png is refused on this side before anything is sent: 6 requests go to the server
    assert "sending 6 requests to tiny-vl" in remote.stderr and "3 at a time" in remote.stderr
    mine = {r["id"]: r for r in read_jsonl(local_out)}
    theirs = {r["id"]: r for r in read_jsonl(remote_out)}
    assert set(theirs) == {r["id"] for r in rows}
    for key in ("text", "img", "img2", "video", "long"):
        assert theirs[key]["error"] is None, theirs[key]
        assert (theirs[key]["text"], theirs[key]["usage"], theirs[key]["finish_reason"]) == \
            (mine[key]["text"], mine[key]["usage"], mine[key]["finish_reason"]), key
    assert theirs["img"]["usage"]["completion_tokens"] <= 6
    assert "gone.png" in theirs["gone"]["error"]  # read on this side: the server never sees it
    assert theirs["remote-url"]["error"] and mine["remote-url"]["error"]  # the server refuses remote URLs
    assert "2 failed" in remote.stderr

    wrong = run_qvl("batch", str(inp), "-o", str(tmp_path / "w.jsonl"), "--endpoint", served, "--api-key", "nope")
    assert wrong.returncode == 1 and "refused the request" in wrong.stderr and "Traceback" not in wrong.stderr
    # nothing the server refused was written; only the line that failed on this side
    assert [r["id"] for r in read_jsonl(tmp_path / "w.jsonl")] == ["gone"]


def test_endpoint_that_cannot_be_reached_is_one_line(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "messages": [{"role": "user", "content": "hi"}]}])
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_qvl("batch", str(inp), "-o", str(tmp_path / "out.jsonl"), "--endpoint", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}/v1" in result.stderr and "Traceback" not in result.stderr


def test_endpoint_refuses_spec_flags(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "messages": [{"role": "user", "content": "hi"}]}])
    result = run_qvl("batch", str(inp), "-o", str(tmp_path / "o.jsonl"), "--endpoint", "http://x", "-s", "7")
    assert result.returncode == 2 and "--endpoint / --model-uid" in result.stderr


def test_a_spec_that_cannot_fit_is_refused_before_the_output_is_touched(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", ["not json", {"id": "a", "messages": [{"role": "user", "content": "hi"}]}])
    out = tmp_path / "out.jsonl"
    result = run_qvl("batch", str(inp), "-o", str(out), "-s", "7", env={"QVL_FAKE_GPUS": "8GiB"})
    assert result.returncode == 1, result.stderr
    assert "7B pytorch needs" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
