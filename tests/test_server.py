"""The OpenAI-compatible server, driven with the official `openai` package.

One real server process (`qvl launch --foreground`, tiny checkpoint, CPU, loopback, an API
key, --allow-local-media) is shared by the module; the last test stops it with SIGTERM and
checks that it stops cleanly.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from media_fixtures import make_frames, make_image, make_video
from serverutil import Foreground, isolated_env, server_pids

KEY = "test-key-123"
UID = "tiny-vl"
TEXT = [{"role": "user", "content": "Hello there."}]


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


class Served:
    def __init__(self, entry: dict, root: Path, media: Path, proc: Foreground) -> None:
        self.entry, self.root, self.media, self.proc = entry, root, media, proc
        self.url = entry["endpoint"]
        self.base = self.url[: -len("/v1")]

    def client(self, key: str | None = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key or "none", max_retries=0, timeout=60, **kw)

    def ask(self, messages=TEXT, **kw):
        kw.setdefault("max_tokens", 12)
        kw.setdefault("temperature", 0)
        return self.client().chat.completions.create(model=UID, messages=messages, **kw)

    def post(self, body, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.post(f"{self.url}/chat/completions", content=content, timeout=60,
                          headers={**headers, "Content-Type": "application/json"})


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    media = root / "media"
    media.mkdir()
    make_image(media / "red.png", 64, 48, (200, 30, 30))
    make_image(root / "outside.png", 64, 48, (30, 30, 200))
    make_video(media / "clip.mp4", seconds=2.0, fps=8)
    os.symlink(root / "outside.png", media / "link.png")
    env = isolated_env(root)
    proc = Foreground(["--model-path", str(tiny_model), "--device", "cpu", "--model-uid", UID,
                       "--api-key", KEY, "--allow-local-media", str(media), "--max-body-mb", "2",
                       "--max-queue", "16", "--max-batch", "4"], env, root / "server.log")
    try:
        yield Served(proc.wait_ready(), root, media, proc)
    finally:
        proc.stop(signal.SIGKILL if proc.proc.poll() is None else 0)


# --- plain requests ---------------------------------------------------------------------------


def test_health_needs_no_key_and_models_lists_the_uid(served):
    health = httpx.get(f"{served.base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["model"] == UID
    models = served.client().models.list()
    assert [m.id for m in models.data] == [UID]
    assert served.client().models.retrieve(UID).id == UID


def test_missing_and_wrong_api_key_are_401(served):
    with pytest.raises(openai.AuthenticationError) as wrong:
        served.client("not-the-key").chat.completions.create(model=UID, messages=TEXT)
    assert wrong.value.status_code == 401 and "wrong" in wrong.value.message
    response = served.post({"model": UID, "messages": TEXT}, key=None)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    assert httpx.get(f"{served.url}/models", timeout=10).status_code == 401


def test_non_streamed_answer_has_text_and_usage(served):
    answer = served.ask()
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == UID
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 10 and 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_answer_matches_and_ends_with_done(served):
    whole = served.ask(max_tokens=16)
    stream = served.ask(max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    body = {"model": UID, "messages": TEXT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{served.url}/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # not asked for


def test_max_tokens_and_max_completion_tokens(served):
    long = [{"role": "user", "content": "Tell me a story."}]
    a = served.ask(long, max_tokens=5, extra_body={"ignore_eos": True})
    assert (a.usage.completion_tokens, a.choices[0].finish_reason) == (5, "length")
    b = served.ask(long, max_tokens=50, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert b.usage.completion_tokens == 3  # max_completion_tokens wins


def test_stop_sequences_cut_the_answer(served):
    long = [{"role": "user", "content": "Tell me a story."}]
    full = served.ask(long, max_tokens=24).choices[0].message.content
    assert len(full) > 12, full
    stop = full[6:9]
    cut = full[: full.index(stop)]
    for value in (stop, ["zzzz-never", stop]):
        answer = served.ask(long, max_tokens=24, stop=value)
        assert answer.choices[0].message.content == cut
        assert answer.choices[0].finish_reason == "stop"
    streamed = served.ask(long, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


# --- media ------------------------------------------------------------------------------------


def _image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url}, **extra}


def test_images_as_data_uris_cost_visual_tokens(served):
    uri = data_uri(served.media / "red.png", "image/png")
    text = served.ask([{"role": "user", "content": [{"type": "text", "text": "Describe."}]}], max_tokens=2)
    one = served.ask([{"role": "user", "content": [_image_part(uri), {"type": "text", "text": "Describe."}]}],
                     max_tokens=2)
    two = served.ask([{"role": "user", "content": [_image_part(uri), _image_part(uri),
                                                   {"type": "text", "text": "Describe."}]}], max_tokens=2)
    per_image = one.usage.prompt_tokens - text.usage.prompt_tokens
    assert per_image == 4 + 2  # 64x48 -> 56x56: 2x2 visual tokens, plus vision start / end
    assert two.usage.prompt_tokens == text.usage.prompt_tokens + 2 * per_image


def test_per_request_pixel_extras(served, tmp_path):
    big = data_uri(make_image(tmp_path / "big.png", 448, 448), "image/png")
    content = [_image_part(big), {"type": "text", "text": "Describe."}]
    default = served.ask([{"role": "user", "content": content}], max_tokens=1).usage.prompt_tokens
    small = served.ask([{"role": "user", "content": content}], max_tokens=1,
                       extra_body={"max_pixels": 16 * 28 * 28}).usage.prompt_tokens
    in_part = served.ask([{"role": "user", "content": [_image_part(big, max_pixels=16 * 28 * 28),
                                                       {"type": "text", "text": "Describe."}]}],
                         max_tokens=1).usage.prompt_tokens
    assert default - small == 256 - 16 and in_part == small


def test_video_as_data_uri_file_url_and_frames(served, tmp_path):
    clip = data_uri(served.media / "clip.mp4", "video/mp4")
    text_only = served.ask([{"role": "user", "content": "Describe."}], max_tokens=1).usage.prompt_tokens

    def video_tokens(part, **extra):
        answer = served.ask([{"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}],
                            max_tokens=4, **extra)
        assert answer.choices[0].message.content is not None
        return answer.usage.prompt_tokens - text_only

    as_data = video_tokens({"type": "video_url", "video_url": {"url": clip}})
    as_file = video_tokens({"type": "video", "video": f"file://{served.media / 'clip.mp4'}"})
    assert as_data == as_file > 2
    more = video_tokens({"type": "video_url", "video_url": {"url": clip}}, extra_body={"fps": 4.0})
    assert more > as_data  # 2 s at 4 fps: 8 frames, not the 4 of the default 2 fps
    frames = [data_uri(p, "image/png") for p in make_frames(tmp_path / "frames", 4)]
    assert video_tokens({"type": "video_url", "video_url": {"url": frames}}) > 2


def test_local_files_only_inside_the_allowed_folder(served):
    inside = f"file://{served.media / 'red.png'}"
    same = data_uri(served.media / "red.png", "image/png")
    by_file = served.ask([{"role": "user", "content": [_image_part(inside), {"type": "text", "text": "x"}]}])
    by_data = served.ask([{"role": "user", "content": [_image_part(same), {"type": "text", "text": "x"}]}])
    assert by_file.choices[0].message.content == by_data.choices[0].message.content
    relative = served.ask([{"role": "user", "content": [_image_part("red.png"), {"type": "text", "text": "x"}]}])
    assert relative.usage.prompt_tokens == by_file.usage.prompt_tokens
    escapes = [f"file://{served.media}/../outside.png", str(served.root / "outside.png"), "../outside.png",
               f"file://{served.media / 'link.png'}", "/etc/hostname"]
    for ref in escapes:
        response = served.post({"model": UID, "messages": [{"role": "user", "content": [_image_part(ref)]}]})
        assert response.status_code == 400, ref
        assert "outside the allowed media folder" in response.json()["error"]["message"], ref


def test_remote_urls_are_refused_by_default(served):
    response = served.post({"model": UID, "messages": [{"role": "user", "content": [
        _image_part("http://127.0.0.1:9/x.png")]}]})
    assert response.status_code == 400
    assert "remote URLs are not allowed" in response.json()["error"]["message"]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": UID}, 400, "'messages' must be a non-empty list"),
    ({"model": UID, "messages": [{"role": "user", "content": 5}]}, 400, "content must be"),
    ({"model": UID, "messages": [{"role": "robot", "content": "hi"}]}, 400, "unsupported role"),
    ({"model": UID, "messages": TEXT, "n": 0}, 400, "'n' must be at least 1"),
    ({"model": UID, "messages": TEXT, "temperature": 5}, 400, "'temperature' must be at most 2"),
    ({"model": UID, "messages": TEXT, "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
    ({"model": UID, "messages": TEXT, "tools": [{"type": "function"}]}, 400, "tool calling"),
    ({"model": "gpt-4o", "messages": TEXT}, 404, "does not exist"),
    ({"model": UID, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "image"),
])
def test_bad_requests_get_openai_errors(served, body, status, words):
    response = served.post(None, raw=body) if isinstance(body, bytes) else served.post(body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] and "hint" in error


def test_unknown_model_raises_not_found_in_the_client(served):
    with pytest.raises(openai.NotFoundError) as err:
        served.client().chat.completions.create(model="nope", messages=TEXT)
    assert err.value.body["code"] == "model_not_found"


def test_body_and_pixel_limits(served, tmp_path):
    too_big = {"model": UID, "messages": [{"role": "user", "content": "x" * (3 * 2**20)}]}
    response = served.post(too_big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("L", (8000, 8000)).save(bomb)  # 64 MP, a few KB compressed
    response = served.post({"model": UID, "messages": [{"role": "user", "content": [
        _image_part(data_uri(bomb, "image/png"))]}]})
    assert response.status_code == 400 and "megapixels" in response.json()["error"]["message"]


# --- the remote backend of `qvl chat` ---------------------------------------------------------


def test_remote_backend_streams_chunks_and_sends_local_media(served):
    from qwenvl_cli import messages
    from qwenvl_cli.generation import GenerationParams, collect
    from qwenvl_cli.backend.remote import Remote, Target

    remote = Remote(Target(served.url, None, KEY))
    params = GenerationParams(max_tokens=12, temperature=0)
    answer = collect(remote([messages.user_message("Hello there.")], params))
    assert answer.text == served.ask().choices[0].message.content
    assert answer.usage.prompt_tokens == served.ask().usage.prompt_tokens
    assert remote.model == UID  # asked the server
    image = messages.user_message("x", images=[str(served.root / "outside.png")])  # client's file
    expected = served.ask([{"role": "user", "content": [
        _image_part(data_uri(served.root / "outside.png", "image/png")), {"type": "text", "text": "x"}]}])
    assert collect(remote([image], params)).text == expected.choices[0].message.content


def test_remote_backend_errors_are_one_line(served):
    from qwenvl_cli.errors import ServerError, UsageError
    from qwenvl_cli.generation import collect
    from qwenvl_cli.backend.remote import Remote, Target

    with pytest.raises(ServerError) as wrong:
        collect(Remote(Target(served.url, UID, "bad"))(TEXT))
    assert "refused" in wrong.value.message and "--api-key" in wrong.value.hint
    with pytest.raises(UsageError) as unknown:
        collect(Remote(Target(served.url, "nope", KEY))(TEXT))
    assert "does not exist" in unknown.value.message and UID in unknown.value.hint
    with pytest.raises(ServerError) as down:
        collect(Remote(Target("http://127.0.0.1:9/v1", UID, KEY))(TEXT))
    assert "cannot reach" in down.value.message


# --- load -------------------------------------------------------------------------------------


def test_concurrent_clients_get_the_answers_they_would_get_alone(served):
    prompts = ["Hello there.", "Tell me a story.", "What is this?", "Describe the sea."]
    alone = {p: served.ask([{"role": "user", "content": p}], max_tokens=10).choices[0].message.content
             for p in prompts}
    before = httpx.get(f"{served.base}/health", timeout=10).json()["queue"]["completed"]

    def client(i: int) -> list[tuple[str, str]]:
        out = []
        for j in range(3):
            prompt = prompts[(i + j) % len(prompts)]
            stream = (i + j) % 2 == 0
            response = served.ask([{"role": "user", "content": prompt}], max_tokens=10, stream=stream)
            text = ("".join(c.choices[0].delta.content or "" for c in response if c.choices) if stream
                    else response.choices[0].message.content)
            out.append((prompt, text))
        return out

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client, range(8)) for r in rs]
    seconds = time.monotonic() - start
    assert len(results) == 24
    assert all(text == alone[prompt] for prompt, text in results)
    health = httpx.get(f"{served.base}/health", timeout=10).json()
    assert health["status"] == "ok" and health["queue"]["completed"] == before + 24
    assert health["queue"]["admitted"] == 0
    assert health["queue"]["largest_batch"] > 1  # --max-batch 4: waiting requests were decoded together
    print(f"\n24 requests from 8 clients in {seconds:.2f} s: {24 / seconds:.1f} requests/s, "
          f"largest batch {health['queue']['largest_batch']}")


def test_client_disconnect_mid_stream_does_not_stall_the_next_request(served):
    body = {"model": UID, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 20000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{served.url}/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any('"content"' in line for line in got)
    start = time.monotonic()
    answer = served.ask(max_tokens=4)
    assert answer.choices[0].message.content is not None
    assert time.monotonic() - start < 15  # 20,000 tokens would take minutes
    for _ in range(100):
        queue = httpx.get(f"{served.base}/health", timeout=10).json()["queue"]
        if queue["admitted"] == 0:
            break
        time.sleep(0.05)
    assert queue["admitted"] == 0 and queue["running"] == 0


def test_a_client_gone_before_its_turn_is_skipped(served):
    """A non-streamed request whose client left while it waited is never generated."""
    long = {"model": UID, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 20000, "ignore_eos": True, "stream": True}
    short = {"model": UID, "messages": TEXT, "max_tokens": 20000, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{served.url}/chat/completions", json=long, timeout=60, headers=headers) as held:
        lines = held.iter_lines()  # keep it: a dropped iterator closes the connection
        next(lines)
        waiting = threading.Thread(target=lambda: _post_and_give_up(served, short, headers), daemon=True)
        waiting.start()
        waiting.join(10)
        queue = httpx.get(f"{served.base}/health", timeout=10).json()["queue"]
        assert queue["running"] == 1 and queue["admitted"] == 1  # the one that gave up left its place
        assert any(next(lines).startswith("data: ") for _ in range(4))  # the held stream still runs
    start = time.monotonic()
    served.ask(max_tokens=2)
    assert time.monotonic() - start < 15


def _post_and_give_up(served, body, headers) -> None:
    try:
        httpx.post(f"{served.url}/chat/completions", json=body, headers=headers, timeout=1.0)
    except httpx.TimeoutException:
        pass


def test_a_malformed_content_length_is_an_openai_shaped_400(served):
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(served.url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n{}")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(payload)["error"]["code"] == "malformed_request"


# --- stop (keep last: it ends the shared server) -------------------------------------------------


def test_foreground_server_stops_cleanly_on_sigterm(served):
    from qwenvl_cli.serve import registry

    home = served.root / "qvl"
    entry = json.loads((home / "run" / f"{UID}.json").read_text())
    assert entry["pid"] == served.proc.proc.pid and entry["state"] == registry.RUNNING
    assert entry["foreground"] is True and entry["api_key"] is True
    assert KEY not in (home / "run" / f"{UID}.json").read_text()
    body = {"model": UID, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 20000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{served.url}/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert any('"content"' in next(lines) for _ in range(6))
        served.proc.proc.send_signal(signal.SIGTERM)  # a stream in flight: cut after the grace
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] != "[DONE]" and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "answer_cut"
    assert served.proc.stop(signal.SIGTERM) == 0
    assert not (home / "run" / f"{UID}.json").exists()
    assert server_pids(home) == []
