"""The server's parts without a model: request parsing, response shapes, the scheduler, the
registry, the media policy of requests and the choice of a chat target."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from media_fixtures import make_image
from qwenvl_cli.serve import api
from qwenvl_cli.serve import registry
from qwenvl_cli.backend import remote
from qwenvl_cli.serve.api import ServerConfig
from qwenvl_cli.errors import MediaError, ServerError, UsageError
from qwenvl_cli.generation import Answer, Chunk, Usage
from qwenvl_cli.serve.scheduler import DONE, QueuedRequest, Scheduler

CONFIG = ServerConfig(uid="m", model_path="/x", aliases=("Qwen/Qwen2-VL-2B-Instruct",))
TEXT = [{"role": "user", "content": "hi"}]


# --- parsing ----------------------------------------------------------------------------------


def test_parse_chat_maps_the_openai_fields():
    chat = api.parse_chat({"model": "Qwen/Qwen2-VL-2B-Instruct", "messages": TEXT, "max_tokens": 9,
                           "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                           "stop": "END", "stream": True, "stream_options": {"include_usage": True},
                           "top_k": 5, "repetition_penalty": 1.1, "n": 1, "user": "ignored",
                           "response_format": {"type": "text"}}, CONFIG)
    assert chat.model == "m" and chat.stream and chat.include_usage
    p = chat.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.top_k, p.repetition_penalty) == (
        7, 0.5, 0.9, 3, ("END",), 5, 1.1)
    assert chat.messages == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert api.parse_chat({"messages": TEXT, "stop": ["a", "b"]}, CONFIG).params.stop == ("a", "b")


def test_pixel_extras_and_server_defaults_reach_the_media_parts():
    config = ServerConfig(uid="m", model_path="/x", max_pixels=200_000)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}, "fps": 1}
    chat = api.parse_chat({"messages": [{"role": "user", "content": [image, video]}], "min_pixels": 3136,
                           "fps": 4}, config)
    img, vid = chat.messages[0]["content"]
    assert (img["min_pixels"], img["max_pixels"]) == (3136, 200_000)
    assert (vid["min_pixels"], vid["max_pixels"], vid["fps"]) == (3136, 200_000, 1)  # the part wins


@pytest.mark.parametrize("body, error, status", [
    ([], "must be a JSON object", 400),
    ({"model": "other", "messages": TEXT}, "does not exist", 404),
    ({"messages": TEXT, "n": 17}, "'n' must be at most 16", 400),
    ({"messages": TEXT, "stop": 5}, "'stop' must be", 400),
    ({"messages": TEXT, "stop": [""]}, "non-empty", 400),
    ({"messages": TEXT, "top_p": 0}, "top_p", 400),
    ({"messages": TEXT, "seed": 1.5}, "'seed' must be an integer", 400),
    ({"messages": TEXT, "temperature": True}, "'temperature' must be a number", 400),
    ({"messages": TEXT, "stream": "yes"}, "'stream' must be true or false", 400),
    ({"messages": TEXT, "top_logprobs": 2}, "'top_logprobs' needs 'logprobs'", 400),
    ({"messages": TEXT, "frequency_penalty": 2.5}, "'frequency_penalty' must be at most 2", 400),
    ({"messages": TEXT, "response_format": {"type": "xml"}}, "'response_format.type' must be one of", 400),
    ({"messages": TEXT, "best_of": 2}, "'best_of'", 400),
    ({"messages": TEXT, "guided_json": {}}, "'guided_json'", 400),
    ({"messages": TEXT, "min_tokens": 3}, "min_tokens is not supported", 400),
    ({"messages": TEXT, "unheard_of": 1}, "'unheard_of' is not a field", 400),
    ({"messages": TEXT, "stream_options": {"include_usage": True}}, "only allowed when 'stream' is true", 400),
    ({"messages": TEXT, "tools": [{"type": "function"}]}, "tool calling", 400),
    ({"messages": TEXT, "seed": 2**64 + 1}, "'seed' must be at most", 400),
    ({"messages": TEXT, "ignore_eos": True, "response_format": {"type": "json_object"}}, "'ignore_eos'", 400),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only user messages", 400),
])
def test_parse_chat_refuses_bad_bodies(body, error, status):
    with pytest.raises(api.HttpError) as err:
        api.parse_chat(body, CONFIG)
    assert error in err.value.message and err.value.status == status


def test_error_bodies_and_statuses():
    assert api.http_error(UsageError("bad", "fix")).status == 400
    from qwenvl_cli.errors import PromptTooLong

    too_long = api.http_error(PromptTooLong("long", "shorter"))
    assert (too_long.status, too_long.code) == (400, "context_length_exceeded")
    crash = api.http_error(RuntimeError("boom"))
    assert crash.status == 500 and crash.type == "server_error"
    body = api.error_body(api.Busy("busy", "later"))
    assert body == {"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                              "code": "queue_full", "hint": "later"}}


def test_response_shapes():
    answer = Answer("hi", "length", Usage(3, 2))
    body = api.completion("id1", "m", [answer], created=5)
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "hi"},
                                  "logprobs": None, "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    last = api.chunk("id1", "m", 5, usage=Usage(3, 2))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 5
    assert api.chunk("id1", "m", 5, finish_reason="cancelled")["choices"][0]["finish_reason"] == "stop"
    assert api.sse({"a": 1}) == b'data: {"a": 1}\n\n'
    config = ServerConfig.from_json(CONFIG.to_json())
    assert config == CONFIG


# --- scheduling -------------------------------------------------------------------------------


class FakeEngine:
    """Yields `tokens` chunks per job, one every `delay` seconds, honouring `cancel`."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.started: list[str] = []
        self.lock = threading.Lock()
        self.busy = 0
        self.overlap = False

    def stream(self, messages, params, prepared=None, cancel=None):
        name = messages
        with self.lock:
            self.busy += 1
            self.overlap |= self.busy > 1
        self.started.append(name)
        try:
            for i in range(params):
                if cancel.is_set():
                    yield Chunk(finish_reason="cancelled")
                    return
                time.sleep(self.delay)
                yield Chunk(text=f"{name}{i} ")
            yield Chunk(finish_reason="length", usage=Usage(1, params))
        finally:
            with self.lock:
                self.busy -= 1


def _job(name: str, tokens: int, out: dict) -> QueuedRequest:
    out[name] = []
    done = threading.Event()
    out[name + "_done"] = done

    def emit(item):
        if item is DONE:
            done.set()
        else:
            out[name].append(item)
    return QueuedRequest(name, tokens, None, emit)


def test_scheduler_runs_jobs_one_at_a_time_in_order():
    engine, out = FakeEngine(), {}
    scheduler = Scheduler(engine, max_pending=8)
    jobs = [_job(n, 3, out) for n in "abcd"]
    for job in jobs:
        scheduler.submit(job)
    for n in "abcd":
        assert out[n + "_done"].wait(5)
    assert engine.started == list("abcd") and not engine.overlap
    assert "".join(c.text for c in out["b"]) == "b0 b1 b2 "
    assert scheduler.stats()["completed"] == 4
    scheduler.close()


def test_scheduler_admission_is_bounded_and_released_once():
    scheduler = Scheduler(FakeEngine(), max_pending=2)
    first, second = scheduler.admit(), scheduler.admit()
    with pytest.raises(api.Busy) as busy:
        scheduler.admit()
    assert busy.value.status == 429
    first.release()
    first.release()  # idempotent
    third = scheduler.admit()
    assert scheduler.stats()["admitted"] == 2
    second.release()
    third.release()
    scheduler.close()
    with pytest.raises(api.Unavailable):
        scheduler.admit()


def test_cancelled_jobs_are_skipped_or_stopped():
    engine, out = FakeEngine(delay=0.05), {}
    scheduler = Scheduler(engine)
    running, waiting, after = _job("r", 1000, out), _job("w", 1000, out), _job("n", 2, out)
    for job in (running, waiting, after):
        scheduler.submit(job)
    time.sleep(0.2)
    waiting.cancel.set()
    running.cancel.set()
    assert out["n_done"].wait(5)  # not stalled behind 1000 tokens
    assert engine.started == ["r", "n"]  # the waiting one never ran
    assert out["r"][-1].finish_reason == "cancelled" and len(out["r"]) < 50
    scheduler.close()


def test_close_cuts_the_running_job():
    from qwenvl_cli.serve.scheduler import Cut

    engine, out = FakeEngine(delay=0.05), {}
    scheduler = Scheduler(engine)
    scheduler.submit(_job("r", 1000, out))
    time.sleep(0.1)
    scheduler.close(timeout=5)
    assert out["r_done"].is_set() and isinstance(out["r"][-1], Cut)


def test_engine_errors_reach_the_job():
    class Broken(FakeEngine):
        def stream(self, *args, **kwargs):
            raise RuntimeError("boom")
            yield  # pragma: no cover

    out = {}
    scheduler = Scheduler(Broken())
    scheduler.submit(_job("x", 1, out))
    assert out["x_done"].wait(5)
    assert isinstance(out["x"][0], RuntimeError) and scheduler.stats()["failed"] == 1
    scheduler.close()


# --- registry ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_registry_reserve_is_exclusive_and_stale_entries_vanish():
    entry = registry.reserve("a", port=1)
    with pytest.raises(ServerError) as taken:
        registry.reserve("a")
    assert "already starting" in taken.value.message and "qvl terminate a" in taken.value.hint
    registry.write(registry.Entry("dead", _dead_pid(), port=2, state=registry.RUNNING))
    reused = registry.Entry("reused", os.getpid(), pid_start="1", state=registry.RUNNING)  # pid reused
    registry.write(reused)
    assert [e.uid for e in registry.entries()] == ["a"]
    assert sorted(p.name for p in (Path(os.environ["QVL_HOME"]) / "run").iterdir()) == ["a.json"]
    assert registry.reserve("dead").uid == "dead"  # a stale entry does not block its UID
    registry.update(entry, state=registry.RUNNING, port=5)
    assert registry.get("a").port == 5 and registry.get("a").endpoint == "http://127.0.0.1:5/v1"
    registry.remove("a", pid=12345)  # not its pid: kept
    assert registry.get("a") is not None
    registry.remove("a")
    assert registry.get("a") is None


def test_registry_find_suggests_and_checks_uids():
    registry.reserve("qwen-vl")
    with pytest.raises(ServerError) as missing:
        registry.find("qwen-lv")
    assert "did you mean qwen-vl" in missing.value.message
    with pytest.raises(UsageError):
        registry.reserve("../evil")


def test_endpoint_of_a_wildcard_bind_is_loopback():
    assert registry.Entry("x", 1, host="0.0.0.0", port=8).endpoint == "http://127.0.0.1:8/v1"
    assert registry.Entry("x", 1, host="::", port=8).endpoint == "http://[::1]:8/v1"


# --- request media ----------------------------------------------------------------------------


def _media(tmp_path: Path, **config) -> "RequestMedia":  # noqa: F821
    from qwenvl_cli.serve.media import RequestMedia, policy_for

    return RequestMedia(policy_for(ServerConfig(uid="m", model_path="/x", **config)))


def test_default_policy_reads_no_local_file_and_fetches_nothing(tmp_path):
    image = make_image(tmp_path / "a.png")
    media = _media(tmp_path)
    for ref in (str(image), f"file://{image}", "a.png"):
        with pytest.raises(MediaError, match="local files are not allowed"):
            media.image(ref)
    with pytest.raises(MediaError, match="local files are not allowed"):
        media.video(str(image))
    with pytest.raises(MediaError, match="remote URLs are not allowed"):
        media.image("http://127.0.0.1:9/a.png")
    with pytest.raises(MediaError, match="remote URLs are not allowed"):
        media.video("https://127.0.0.1:9/a.mp4")


def test_each_refusal_names_the_flag_that_allows_it(tmp_path):
    """No hints in a circle: a refused file names --allow-local-media, a refused URL
    --allow-remote-media, and neither suggests the other refused kind."""
    image = make_image(tmp_path / "a.png")
    media = _media(tmp_path)
    with pytest.raises(MediaError) as local:
        media.image(str(image))
    assert "--allow-local-media DIR" in local.value.hint and "URL" not in local.value.hint
    with pytest.raises(MediaError) as remote:
        media.image("http://127.0.0.1:9/a.png")
    assert "--allow-remote-media" in remote.value.hint and "local file" not in remote.value.hint


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_remote_media_when_allowed_is_bounded(tmp_path):
    make_image(tmp_path / "a.png", 64, 48)
    (tmp_path / "big.bin").write_bytes(b"\0" * 300_000)
    handler = lambda *a, **kw: _Files(*a, directory=str(tmp_path), **kw)  # noqa: E731
    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # the client hung up on big.bin: fine
            pass

    server = Quiet(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        media = _media(tmp_path, allow_remote_media=True, max_body_bytes=200_000,
                       allow_media_domains=("127.0.0.1",))
        source = media.image(f"{url}/a.png")
        assert (source.width, source.height) == (64, 48)
        with pytest.raises(MediaError, match="larger than the 200000 byte limit"):
            media.image(f"{url}/big.bin")
    finally:
        server.shutdown()


def test_inline_videos_are_written_privately_and_removed(tmp_path):
    import base64

    from media_fixtures import make_video

    clip = make_video(tmp_path / "c.mp4", seconds=1, fps=4)
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    with _media(tmp_path) as media:
        source = media.video(uri)
        written = source.path
        assert written.is_file() and written.parent != tmp_path and source.source.startswith("data:video/mp4")
    assert not written.exists()
    with pytest.raises(MediaError, match="only base64 videos"):
        _media(tmp_path).video("data:text/plain;base64,AAAA")


# --- where chat goes --------------------------------------------------------------------------


def _running(uid: str, **kw) -> registry.Entry:
    return registry.write(registry.Entry(uid, os.getpid(), port=9, state=registry.RUNNING, **kw))


def test_pick_target_rules(monkeypatch):
    assert remote.pick_target() is None  # nothing launched: in-process
    _running("one")
    target = remote.pick_target()
    assert (target.base_url, target.model, target.uid) == ("http://127.0.0.1:9/v1", "one", "one")
    assert remote.pick_target(spec_given=True) is None
    _running("two", api_key=True)
    with pytest.raises(UsageError, match="2 launched models are running"):
        remote.pick_target()
    with pytest.raises(ServerError, match="launched with an API key"):
        remote.pick_target(model_uid="two")
    assert remote.pick_target(model_uid="two", api_key="k").api_key == "k"
    monkeypatch.setenv("QVL_API_KEY", "env")
    assert remote.pick_target(model_uid="two").api_key == "env"
    with pytest.raises(ServerError, match="no running model with UID 'three'"):
        remote.pick_target(model_uid="three")
    far = remote.pick_target(endpoint="example.org:8000", model_uid="x", spec_given=True)
    assert (far.base_url, far.model) == ("http://example.org:8000/v1", "x")


@pytest.mark.parametrize("url, expected", [
    ("http://h:1", "http://h:1/v1"), ("http://h:1/v1/", "http://h:1/v1"),
    ("https://h/api/openai/v1", "https://h/api/openai/v1"), ("h:1", "http://h:1/v1")])
def test_endpoint_normalisation(url, expected):
    assert remote.normalise_endpoint(url) == expected


def test_request_options_use_openai_names_and_extras():
    from qwenvl_cli.generation import GenerationParams

    options = remote.request_options(GenerationParams(max_tokens=5, temperature=0, stop=("x",), top_k=3))
    assert options == {"max_tokens": 5, "temperature": 0, "stop": ["x"], "extra_body": {"top_k": 3}}


def test_wire_messages_inline_local_files(tmp_path):
    image = make_image(tmp_path / "a.png")
    wire = remote.wire_messages([{"role": "user", "content": [
        {"type": "image", "image": str(image), "max_pixels": 1000},
        {"type": "text", "text": "x"}]}, {"role": "assistant", "content": "ok"}])
    part = wire[0]["content"][0]
    assert part["image_url"]["url"].startswith("data:image/png;base64,") and part["max_pixels"] == 1000
    assert wire[1] == {"role": "assistant", "content": "ok"}
    with pytest.raises(UsageError, match="cannot read"):
        remote.wire_messages([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "no.png")}]}])


# --- start-up cost ----------------------------------------------------------------------------


class _Params:
    def __init__(self, key: str, tokens: int = 2) -> None:
        self.key, self.tokens = key, tokens

    def batch_key(self):
        return self.key


def test_scheduler_batches_waiting_jobs_with_the_same_key():
    class Batching:
        def __init__(self):
            self.batches, self.gate, self.started = [], threading.Event(), threading.Event()

        def job(self, messages, params, prepared, cancel):
            return messages

        def stream(self, messages, params, prepared=None, cancel=None):
            self.started.set()
            self.gate.wait(5)
            self.batches.append([messages])
            yield Chunk(finish_reason="stop", usage=Usage(1, 1))

        def run_jobs(self, jobs):
            self.batches.append(list(jobs))
            for i, _ in enumerate(jobs):
                yield i, Chunk(text=f"{i}")
                yield i, Chunk(finish_reason="stop", usage=Usage(1, 1))

    engine, out = Batching(), {}
    scheduler = Scheduler(engine, max_batch=3)
    jobs = {n: _job(n, 0, out) for n in ("first", "a1", "b1", "a2", "a3", "a4", "gone")}
    for name, job in jobs.items():
        job.params = _Params("b" if name.startswith("b") else "a")
        scheduler.submit(job)
        if name == "first":  # it runs alone (the gate holds it) while the rest queue up
            assert engine.started.wait(5)
    jobs["gone"].cancel.set()
    engine.gate.set()
    for name in jobs:
        assert out[name + "_done"].wait(5), name
    assert engine.batches == [["first"], ["a1", "a2", "a3"], ["b1"], ["a4"]]
    assert [c.text for c in out["a2"]] == ["1", ""] and out["gone"] == []
    assert scheduler.stats()["largest_batch"] == 3
    scheduler.close()


def test_out_of_memory_answers_503_and_too_large_a_prompt_400():
    from qwenvl_cli.serve import api
    from qwenvl_cli.errors import OutOfMemory, PromptTooLarge

    assert api.http_error(OutOfMemory("out of memory on cuda:0", "lower --max-pixels")).status == 503
    assert api.http_error(PromptTooLarge("this prompt needs ~9.0 GiB more", "lower --max-pixels")).status == 400
