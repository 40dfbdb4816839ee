"""The server under faults, without a model: the scheduler's supervisor, identity removal,
disconnected clients leaving the queue, shutdown with a grace period, and cut answers."""

from __future__ import annotations

import threading
import time

import pytest

from qwenvl_cli.generation import Chunk, Usage
from qwenvl_cli.serve import api
from qwenvl_cli.serve.scheduler import Cut, QueuedRequest, Scheduler


class Params:
    def __init__(self, tokens: int = 3) -> None:
        self.tokens = tokens

    def batch_key(self):
        return "k"


class Tensorish:
    """Compares like a tensor: ``==`` gives something whose truth value raises."""

    def __eq__(self, other):
        class Ambiguous:
            def __bool__(self):
                raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous")
        return Ambiguous()


class Engine:
    def __init__(self, delay: float = 0.01) -> None:
        self.delay, self.gate = delay, threading.Event()
        self.gate.set()
        self.started: list[str] = []

    def job(self, messages, params, prepared, cancel):
        return (messages, params, cancel)

    def _tokens(self, name, params, cancel):
        self.started.append(name)
        self.gate.wait(10)
        for i in range(params.tokens):
            if cancel.is_set():
                yield Chunk(text="", finish_reason="cancelled")
                return
            time.sleep(self.delay)
            yield Chunk(text=f"{name}{i} ")
        yield Chunk(finish_reason="length", usage=Usage(1, params.tokens))

    def stream(self, messages, params, prepared=None, cancel=None):
        yield from self._tokens(messages, params, cancel)

    def run_jobs(self, jobs):
        for index, (name, params, cancel) in enumerate(jobs):
            for chunk in self._tokens(name, params, cancel):
                yield index, chunk


def job(name: str, out: dict, tokens: int = 3, prepared=None) -> QueuedRequest:
    """test_server_parts' job, with sampling parameters that batch and a ``prepared`` payload."""
    from test_server_parts import _job

    queued = _job(name, tokens, out)
    queued.params, queued.prepared = Params(tokens), prepared
    return queued


def test_a_job_queued_behind_an_equal_cancelled_copy_is_removed_by_identity():
    engine, out = Engine(), {}
    engine.gate.clear()
    scheduler = Scheduler(engine, max_batch=4)
    first = job("first", out)
    scheduler.submit(first)
    time.sleep(0.1)  # "first" runs (held by the gate) while the rest queue up
    retry_a, retry_b = job("same", out, prepared=Tensorish()), job("same2", out, prepared=Tensorish())
    retry_b.messages, retry_b.params = "same", retry_a.params  # a client's retry: the same request twice
    retry_a.cancel.set()
    scheduler.submit(retry_a)
    scheduler.submit(retry_b)
    engine.gate.set()
    assert out["same2_done"].wait(5), "the scheduler thread died"
    assert scheduler.failure is None and "".join(c.text for c in out["same2"]).startswith("same0")
    scheduler.close()


def test_a_dead_scheduler_fails_the_waiting_requests_with_503_and_reports_it():
    engine, out, failures = Engine(), {}, []
    engine.gate.clear()
    scheduler = Scheduler(engine, on_failure=failures.append)
    scheduler.submit(job("running", out))
    time.sleep(0.1)
    waiting = job("waiting", out)
    scheduler.submit(waiting)

    def broken_take():
        raise RuntimeError("injected into the scheduler loop")
    scheduler._take = broken_take
    engine.gate.set()
    assert out["waiting_done"].wait(5)
    error = out["waiting"][-1]
    assert isinstance(error, api.Unavailable) and error.status == 503
    assert "injected" in error.message
    assert len(failures) == 1 and isinstance(scheduler.failure, RuntimeError)
    with pytest.raises(api.Unavailable):
        scheduler.admit()


def test_a_disconnected_clients_job_leaves_the_queue_at_once():
    engine, out = Engine(), {}
    engine.gate.clear()
    scheduler = Scheduler(engine, max_pending=4)
    scheduler.submit(job("running", out))
    time.sleep(0.1)
    gone = job("gone", out, prepared=bytearray(10_000_000))
    scheduler.submit(gone)
    assert scheduler.stats()["waiting"] == 1
    scheduler.discard(gone)
    stats = scheduler.stats()
    assert stats["waiting"] == 0 and stats["abandoned"] == 1
    assert out["gone_done"].is_set() and gone.prepared is None  # its memory is freed now
    engine.gate.set()
    assert out["running_done"].wait(5) and engine.started == ["running"]
    scheduler.close()


def test_shutdown_waits_the_grace_then_fails_the_queue_with_503_and_cuts_the_running():
    engine, out = Engine(delay=0.05), {}
    scheduler = Scheduler(engine)
    scheduler.submit(job("short", out, tokens=2))
    scheduler.submit(job("long", out, tokens=1000))
    scheduler.submit(job("queued", out, tokens=2))
    time.sleep(0.05)
    started = time.monotonic()
    scheduler.close(grace=0.6)
    assert 0.5 < time.monotonic() - started < 5
    assert out["short"][-1].finish_reason == "length"  # finished within the grace
    assert isinstance(out["long"][-1], Cut) and out["long"][-1].status == 503
    assert not any(getattr(c, "finish_reason", None) in ("stop", "cancelled") for c in out["long"])
    assert isinstance(out["queued"][-1], api.Unavailable) and out["queued"][-1].status == 503
    assert scheduler.stats()["cut"] == 1
    assert all(out[n + "_done"].is_set() for n in ("short", "long", "queued"))


# --- preparation: fetches do not hold up the rest ---------------------------------------------


class _Trickle(threading.Thread):
    """A loopback server that accepts connections and never answers (until stopped)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list = []

    def run(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return


def test_requests_without_a_fetch_pass_the_ones_waiting_on_a_slow_server():
    from qwenvl_cli.serve import server

    from types import SimpleNamespace

    prepared = SimpleNamespace(prompt_tokens=1)

    class Tokenizer:
        context_length = 32768

        def validate(self, params):
            pass

        def prepare(self, messages, policy=None):
            return prepared

    slow = _Trickle()
    slow.start()
    config = api.ServerConfig(uid="m", model_path="/x", allow_remote_media=True, media_timeout=3,
                              allow_media_domains=("127.0.0.1",))
    state = server.ServerState(config, None)
    state.engine = Tokenizer()
    image = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{slow.port}/a.png"}}
    fetching = api.parse_chat({"messages": [{"role": "user", "content": [image]}]}, config)
    errors = []

    def fetch():
        try:
            state.prepare(fetching)
        except Exception as exc:  # noqa: BLE001 - the time-out is expected
            errors.append(exc)
    threads = [threading.Thread(target=fetch, daemon=True) for _ in range(server.FETCH_SLOTS + 2)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    text = api.parse_chat({"messages": [{"role": "user", "content": "hi"}]}, config)
    started = time.monotonic()
    assert state.prepare(text)[1] is prepared
    assert time.monotonic() - started < 0.5
    for thread in threads:
        thread.join(10)
    assert len(errors) == len(threads) and all("timed out" in str(e) for e in errors)
    slow.sock.close()


def test_a_broken_inline_video_names_no_temporary_path(tmp_path):
    import base64

    from qwenvl_cli.errors import MediaError
    from qwenvl_cli.serve.media import RequestMedia, policy_for

    config = api.ServerConfig(uid="m", model_path="/x")
    uri = "data:video/mp4;base64," + base64.b64encode(b"not a video at all" * 10).decode()
    with RequestMedia(policy_for(config)) as media, pytest.raises(MediaError) as err:
        media.video(uri)
    import tempfile

    assert tempfile.gettempdir() not in err.value.message and "qvl-request-" not in err.value.message


# --- per-request sizing bounds ------------------------------------------------------------------


@pytest.mark.parametrize("extra, words", [
    ({"min_pixels": 1e12}, "'min_pixels' 1e+12"),
    ({"min_pixels": 6e7}, "'min_pixels' 6e+07"),
    ({"min_pixels": 2e7}, "'min_pixels' 2e+07"),
    ({"max_pixels": 1e300}, "'max_pixels'"),
    ({"resized_height": float("nan"), "resized_width": 56}, "finite positive"),
    ({"resized_height": 1e300, "resized_width": 1e300}, "'resized_height' x 'resized_width'"),
    ({"max_pixels": 1}, "is above max_pixels (1)"),
])
def test_sizing_fields_beyond_the_servers_bound_are_refused_before_decoding(tmp_path, extra, words):
    import base64

    from media_fixtures import make_image
    from qwenvl_cli.errors import MediaError
    from qwenvl_cli.serve.media import RequestMedia, policy_for

    config = api.ServerConfig(uid="m", model_path="/x", max_pixels=1000)
    png = make_image(tmp_path / "a.png", 64, 48).read_bytes()
    part = {"type": "image", "image": "data:image/png;base64," + base64.b64encode(png).decode(), **extra}
    with RequestMedia(policy_for(config)) as media, pytest.raises(MediaError) as err:
        media.resolve([{"role": "user", "content": [part]}])
    assert words in err.value.message
    assert api.http_error(err.value).status == 400


def test_sizing_within_the_bound_is_kept(tmp_path):
    import base64

    from media_fixtures import make_image
    from qwenvl_cli.serve.media import RequestMedia, policy_for

    png = make_image(tmp_path / "a.png", 64, 48).read_bytes()
    part = {"type": "image", "image": "data:image/png;base64," + base64.b64encode(png).decode(),
            "min_pixels": 3136, "max_pixels": 200_000}
    with RequestMedia(policy_for(api.ServerConfig(uid="m", model_path="/x"))) as media:
        out = media.resolve([{"role": "user", "content": [part]}])
    assert out[0]["content"][0]["image"].width == 64


def test_errors_while_decoding_a_written_video_name_what_the_client_sent(tmp_path):
    import base64
    import tempfile

    from media_fixtures import make_video
    from qwenvl_cli.errors import MediaError
    from qwenvl_cli.serve.media import RequestMedia, policy_for

    clip = make_video(tmp_path / "c.mp4", seconds=1, fps=4)
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    with RequestMedia(policy_for(api.ServerConfig(uid="m", model_path="/x"))) as media:
        written = media.video(uri).path
        with pytest.raises(MediaError) as err, media.scrubbed():
            raise MediaError(f"{written} is truncated at frame 3", f"re-encode {written}")
    assert tempfile.gettempdir() not in err.value.message + err.value.hint
    assert err.value.message.startswith("data:video/mp4") and "frame 3" in err.value.message


def test_video_sizing_is_bounded_per_frame():
    from qwenvl_cli.errors import MediaError
    from qwenvl_cli.serve.media import RequestMedia, policy_for

    media = RequestMedia(policy_for(api.ServerConfig(uid="m", model_path="/x")))
    part = {"type": "video", "video": "data:video/mp4;base64,AAAA", "min_pixels": 1e7}
    with pytest.raises(MediaError, match="'min_pixels' 1e\\+07 of a video frame"):
        media.resolve([{"role": "user", "content": [part]}])


class ContinuousEngine(Engine):
    """Continuous batching as Engine.run_continuous does it: jobs join between steps."""

    class decoder:  # noqa: N801 - the attribute the scheduler probes
        pool = object()

    def job(self, messages, params, prepared, cancel):
        return {"name": messages, "left": params.tokens, "cancel": cancel, "i": 0}

    def run_continuous(self, take, max_batch):
        running = []
        while True:
            running += take(max_batch - len(running), not running)
            if not running:
                return
            time.sleep(self.delay)
            for job in list(running):
                if job["cancel"].is_set():
                    running.remove(job)
                    yield job, Chunk(finish_reason="cancelled")
                elif job["i"] == job["left"]:
                    running.remove(job)
                    yield job, Chunk(finish_reason="length", usage=Usage(1, job["i"]))
                else:
                    job["i"] += 1
                    yield job, Chunk(text=f"{job['name']}{job['i'] - 1} ")


def test_continuous_batching_shutdown_finishes_within_the_grace_then_cuts_and_refuses():
    engine, out = ContinuousEngine(delay=0.05), {}
    scheduler = Scheduler(engine, max_batch=2)
    assert scheduler._continuous()
    for name, tokens in (("short", 2), ("long", 1000), ("later", 3), ("queued", 1000), ("last", 2)):
        scheduler.submit(job(name, out, tokens=tokens))
    time.sleep(0.05)
    scheduler.close(grace=0.8)
    assert out["short"][-1].finish_reason == "length" and out["later"][-1].finish_reason == "length"
    assert isinstance(out["long"][-1], Cut) and isinstance(out["queued"][-1], Cut)
    assert isinstance(out["last"][-1], api.Unavailable) and not isinstance(out["last"][-1], Cut)  # never ran
    assert scheduler.stats()["cut"] == 2
    assert all(out[n + "_done"].wait(5) for n in ("short", "long", "later", "queued", "last"))
