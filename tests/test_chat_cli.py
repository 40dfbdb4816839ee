"""`qvl chat` as a real process on the tiny checkpoint: streams, JSON, the REPL, Ctrl-C,
and one clear line for every kind of bad input (before any model is loaded)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import qvl_env, run_qvl
from media_fixtures import make_image, make_video, png_header

GREEDY = ["--temperature", "0", "--max-tokens", "12"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-media")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("this is text, not an image")
    png = make_image(root / "red.png", 200, 150)
    (root / "truncated.png").write_bytes(png.read_bytes()[:60])
    (root / "bomb.png").write_bytes(png_header(100000, 100000))  # 10 gigapixels claimed
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    (root / "dir").mkdir()
    return {"root": root, "red": str(png), "clip": str(make_video(root / "clip.mp4", 2, 8))}


def chat(tiny_model, *args, **kwargs):
    return run_qvl("chat", "--model-path", str(tiny_model), *args, **kwargs)


def test_one_shot_streams_only_the_answer_on_stdout(tiny_model, files):
    from qwenvl_cli.engine.engine import Engine
    from qwenvl_cli.engine.options import EngineOptions
    from qwenvl_cli.generation import GenerationParams, collect
    from qwenvl_cli.messages import user_message

    proc = chat(tiny_model, "--image", files["red"], *GREEDY, "What is in this picture?")
    assert proc.returncode == 0, proc.stderr
    engine = Engine.load(tiny_model, EngineOptions(device="cpu"))
    expected = collect(engine.stream([user_message("What is in this picture?", [files["red"]])],
                                     GenerationParams(temperature=0, max_tokens=12))).text
    assert proc.stdout == expected + "\n"
    assert "loaded" in proc.stderr and "Traceback" not in proc.stderr


def test_json_stats_verbose_and_video(tiny_model, files):
    proc = chat(tiny_model, "--video", files["clip"], "--fps", "4", *GREEDY, "--json", "--stats",
                "--verbose", "Describe the clip")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["usage"]["completion_tokens"] <= 12 and data["finish_reason"] in ("stop", "length")
    assert data["usage"]["prompt_tokens"] > 20 and data["timings"]["time_to_first_token"] > 0
    assert data["model"]["device"] == "cpu"
    assert "prompt +" in proc.stderr and "completion tokens" in proc.stderr  # --stats
    assert "frames" in proc.stderr and "visual tokens" in proc.stderr  # --verbose


def test_prompt_from_stdin_and_system_prompt(tiny_model):
    proc = chat(tiny_model, *GREEDY, "--system", "Answer in French.", "--quiet", "-", input="Hello there.\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and proc.stderr == ""


@pytest.mark.parametrize("args,fragment", [
    (["--image", "{root}/nope.png"], "no such file"),
    (["--image", "{root}/dir"], "directory"),
    (["--image", "{root}/empty.png"], "empty"),
    (["--image", "{root}/truncated.png"], "truncated"),
    (["--image", "{root}/notes.png"], "not an image"),
    (["--image", "{root}/bomb.png"], "pixels"),
    (["--video", "{root}/broken.mp4"], "video"),
    (["--video", "{root}/nope.mp4"], "no such file"),
    (["--image", "ftp://example.com/x.png"], "ftp"),
    (["--image", "http://127.0.0.1:9/x.png"], "127.0.0.1"),
    (["--max-tokens", "0"], "max_tokens must be a whole number of at least 1"),
    (["--max-tokens", "-3"], "max_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--min-pixels", "2000000", "--max-pixels", "1000000"], "--min-pixels 2000000 is above"),
    (["--fps", "0"], "fps"),
    (["--device", "tpu"], "unknown --device"),
    (["--gpu-idx", "0"], "no CUDA GPU"),
])
def test_bad_input_is_one_line_and_non_zero(tiny_model, files, args, fragment):
    args = [a.replace("{root}", str(files["root"])) for a in args]
    proc = chat(tiny_model, *args, "hello", timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("loading")]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and fragment.lower() in errors[0].lower(), proc.stderr


def test_media_errors_come_before_loading_the_model(tiny_model, files):
    proc = chat(tiny_model, "--image", str(files["root"] / "nope.png"), "hi")
    assert proc.returncode == 2 and "loading" not in proc.stderr and "loaded" not in proc.stderr


def test_prompt_longer_than_the_context_length(tiny_model):
    proc = chat(tiny_model, "--max-tokens", "4", "-", input="word " * 40000, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "tokens long; the model's context length is 32768" in proc.stderr


def test_scripted_repl_with_media_and_commands(tiny_model, files, tmp_path):
    saved = tmp_path / "conv.json"
    script = "\n".join([f"/image {files['red']}", "/set max_tokens 6", "/set temperature 0", "What is it?",
                        "/show", f"/save {saved}", "/image /no/such.png", "/exit", ""])
    proc = chat(tiny_model, input=script)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 1
    assert "image attached" in proc.stderr and "turns: 1" in proc.stderr
    assert "error: no such file: /no/such.png" in proc.stderr
    data = json.loads(saved.read_text())
    assert data["messages"][0]["content"][0]["image"] == files["red"]
    assert data["params"] == {"max_tokens": 6, "temperature": 0.0}


def wait_for(predicate, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_in_the_repl_stops_the_answer_and_keeps_the_conversation(tiny_model):
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_cli", "chat", "--model-path", str(tiny_model),
                             "--temperature", "0", "--max-tokens", "100000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=qvl_env(), text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        proc.stdin.write("Tell me a story.\n")
        proc.stdin.flush()
        assert wait_for(lambda: len(out) > 20), "no answer started"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/show\n/exit\n")
        proc.stdin.flush()
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()
        assert "[answer stopped]" in err and "turns: 1" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_in_one_shot_exits_130(tiny_model):
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_cli", "chat", "--model-path", str(tiny_model),
                             "--temperature", "0", "--max-tokens", "100000", "Tell me a story."],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=qvl_env(), text=True)
    try:
        assert wait_for(lambda: proc.stdout.read(1) != "")
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_extreme_aspect_ratio_is_refused_before_the_model_loads(tiny_model, tmp_path):
    """205:1 cannot be sized: said with the other media checks, not after a model load."""
    thin = make_image(tmp_path / "thin.png", 2050, 10)
    started = time.monotonic()
    proc = run_qvl("chat", "--model-path", str(tiny_model), "--image", str(thin), "What is it?")
    assert proc.returncode == 2, proc.stderr
    assert "aspect ratio 205:1 (2050x10) is above 200:1" in proc.stderr
    assert "loaded" not in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 20
