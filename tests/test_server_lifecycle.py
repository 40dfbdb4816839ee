"""The real HTTP app and scheduler on a loopback uvicorn, over an engine that streams slowly:
readiness, protocol-level refusals, shutdown with a grace period, disconnected clients."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from qwenvl_cli.generation import Chunk, Usage
from qwenvl_cli.serve import api, server
from qwenvl_cli.serve.protocol import openai_h11_protocol


class SlowEngine:
    """``params.max_tokens`` chunks, one every ``delay`` s, honouring ``cancel``."""

    context_length = 32768

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay

    def validate(self, params):  # what only a loaded model checks: nothing to check here
        pass

    def prepare(self, messages, policy=None):
        from types import SimpleNamespace

        return SimpleNamespace(tensors=b"x" * 1000, prompt_tokens=1)

    def stream(self, messages, params, prepared=None, cancel=None):
        for i in range(params.max_tokens):
            if cancel.is_set():
                yield Chunk(finish_reason="cancelled", usage=Usage(1, i))
                return
            time.sleep(self.delay)
            yield Chunk(text=f"t{i} ")
        yield Chunk(finish_reason="length", usage=Usage(1, params.max_tokens))


class App:
    def __init__(self, ready: bool = True, **config) -> None:
        import uvicorn

        self.state = server.ServerState(api.ServerConfig(uid="m", model_path="/x", **config), None)
        if ready:
            self.state.ready(SlowEngine())
        self.sock = server.bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(server.create_app(self.state), log_level="critical",
                                                    lifespan="off", http=openai_h11_protocol(),
                                                    timeout_graceful_shutdown=15))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=30)

    def shutdown(self) -> None:
        """What SIGTERM does: the state stops (the scheduler's grace runs), then uvicorn."""
        self.state.stop()
        self.server.should_exit = True

    def close(self) -> None:
        self.shutdown()
        self.thread.join(20)
        self.sock.close()


def ask(max_tokens: int, stream: bool = False) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": stream}


def test_models_and_health_answer_503_until_the_model_is_ready():
    app = App(ready=False)
    try:
        for path in ("/v1/models", "/v1/models/m", "/health"):
            response = httpx.get(app.url + path, timeout=10)
            assert response.status_code == 503, path
            assert response.headers.get("retry-after") or path == "/health"
        app.state.ready(SlowEngine())
        assert httpx.get(app.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "m"
        assert httpx.get(app.url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        app.close()


def test_a_dead_scheduler_turns_health_and_models_to_503():
    app = App()
    stopped = []
    app.state.on_fatal = lambda: stopped.append(True)
    try:
        app.state.scheduler._take = lambda: (_ for _ in ()).throw(RuntimeError("injected"))
        response = httpx.post(app.url + "/v1/chat/completions", json=ask(3), timeout=10)
        # The request already waiting in the old loop's _take is served; the next take dies.
        deadline = time.monotonic() + 5
        while not stopped and time.monotonic() < deadline:
            httpx.post(app.url + "/v1/chat/completions", json=ask(1), timeout=10)
            time.sleep(0.05)
        assert stopped, "the scheduler's death was not reported"
        health = httpx.get(app.url + "/health", timeout=10)
        assert health.status_code == 503 and "scheduler stopped" in health.json()["error"]
        assert httpx.get(app.url + "/v1/models", timeout=10).status_code == 503
        assert response.status_code in (200, 503)
    finally:
        app.close()


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1, 2"])
def test_a_malformed_content_length_gets_an_openai_shaped_400(length):
    app = App()
    try:
        with socket.create_connection(app.sock.getsockname(), timeout=10) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + length + b"\r\n\r\n{}")
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower()
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and "Content-Length" in error["message"]
    finally:
        app.close()


def test_shutdown_cuts_a_stream_with_an_error_event_and_answers_queued_requests_503():
    app = App(shutdown_grace=0.5)
    events, queued = [], {}
    try:
        def stream():
            with httpx.stream("POST", app.url + "/v1/chat/completions", json=ask(1000, stream=True),
                              timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        def waiting():
            queued["response"] = httpx.post(app.url + "/v1/chat/completions", json=ask(5), timeout=30)
        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(0.4)
        waiter = threading.Thread(target=waiting)
        waiter.start()
        time.sleep(0.3)
        started = time.monotonic()
        app.shutdown()
        streamer.join(15)
        waiter.join(15)
        assert time.monotonic() - started < 10
        assert events and events[-1] != "[DONE]" and "[DONE]" not in events
        last = json.loads(events[-1])
        assert last["error"]["code"] == "answer_cut" and "shut down" in last["error"]["message"]
        finishes = [c["choices"][0].get("finish_reason") for c in map(json.loads, events[:-1]) if c.get("choices")]
        assert not any(finishes), "a cut stream must not carry a finish_reason"
        response = queued["response"]
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["error"]["type"] == "service_unavailable"
        assert app.state.scheduler.stats()["cut"] == 1
    finally:
        app.close()


def test_shutdown_lets_an_answer_finish_within_the_grace():
    app = App(shutdown_grace=5)
    try:
        result, client = {}, app.client()
        thread = threading.Thread(target=lambda: result.update(answer=client.chat.completions.create(**ask(20))))
        thread.start()
        deadline = time.monotonic() + 10
        while not app.state.scheduler.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        app.state.stop()  # the server stops taking work; the answer in progress may finish
        thread.join(15)
        answer = result["answer"]
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 20
        with pytest.raises(openai.APIStatusError) as err:  # new work is refused meanwhile
            client.chat.completions.create(**ask(1))
        assert err.value.status_code == 503
        assert answer.choices[0].message.content.startswith("t0 t1 ")
    finally:
        app.close()


def test_disconnected_clients_leave_the_queue_and_it_stays_bounded():
    app = App(max_queue=4)
    try:
        def give_up():
            try:
                httpx.post(app.url + "/v1/chat/completions", json=ask(200), timeout=0.3)
            except httpx.TimeoutException:
                pass
        for _ in range(3):  # three rounds of four clients that give up while queued
            threads = [threading.Thread(target=give_up) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(5)
            time.sleep(0.3)
            stats = app.state.scheduler.stats()
            assert stats["waiting"] + stats["running"] <= 4 and stats["admitted"] <= 4
        deadline = time.monotonic() + 5
        while app.state.scheduler.stats()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = app.state.scheduler.stats()
        assert stats["waiting"] == 0 and stats["abandoned"] >= 9
        answer = app.client().chat.completions.create(**ask(2))
        assert answer.choices[0].message.content == "t0 t1 "
    finally:
        app.close()
