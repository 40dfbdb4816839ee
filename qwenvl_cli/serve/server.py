"""The OpenAI-compatible HTTP server over one engine (Starlette on uvicorn).

Only the server process imports this module's web stack: `qvl launch` starts
``python -m qwenvl_cli.serve.server`` (configuration in the environment, status events as JSON lines
on an inherited pipe), `qvl launch --foreground` calls :func:`serve` in its own process.

The socket is bound first (a port in use fails at once), the model loads on a thread while
``/health`` answers 503 "loading", then the registry entry turns "running" and a ``ready``
event is sent. Requests go through :class:`~qwenvl_cli.serve.scheduler.Scheduler`; SIGINT / SIGTERM
cancel the generations in flight, stop the server and remove the registry entry.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from qwenvl_cli import settings
from qwenvl_cli.errors import EngineError, QvlError, ServerError, UsageError, translate
from qwenvl_cli.generation import Answer
from qwenvl_cli.serve import api, registry
from qwenvl_cli.serve.api import HttpError, ServerConfig, TooLarge, Unauthorized, Unavailable
from qwenvl_cli.serve.scheduler import DONE, QueuedRequest, Scheduler

Announce = Callable[[dict[str, Any]], None]
PREPARE_SLOTS = 2  # requests decoding media / tokenizing at once, beside the running one


class ServerState:
    def __init__(self, config: ServerConfig, api_key: str | None) -> None:
        self.config = config
        self.api_key = api_key
        self.engine: Any = None
        self.scheduler: Scheduler | None = None
        self.error: QvlError | None = None
        self.stopping = False
        self.created = int(time.time())
        self.prepare_slots = threading.BoundedSemaphore(PREPARE_SLOTS)

    def ready(self, engine: Any) -> None:
        self.scheduler = Scheduler(engine, self.config.max_queue, self.config.max_batch)
        self.engine = engine

    def require_ready(self) -> Scheduler:
        if self.stopping:
            raise Unavailable("the server is shutting down", "retry on another server")
        if self.scheduler is None:
            raise Unavailable("the model is still loading", "retry in a moment (GET /health says when it is ready)")
        return self.scheduler

    def stop(self) -> None:
        self.stopping = True
        if self.scheduler is not None:
            threading.Thread(target=self.scheduler.close, daemon=True).start()

    def prepare(self, chat: api.ChatRequest) -> tuple[list[dict[str, Any]], Any]:
        """Check and decode the media with the server's policy, then tokenize (a worker thread).
        A cluster's ingress (serve/cluster.py) leaves this to the engine replica."""
        from qwenvl_cli.serve.media import RequestMedia, policy_for

        policy = policy_for(self.config)
        with self.prepare_slots, RequestMedia(policy) as media:
            messages = media.resolve(chat.messages)  # checked sources; the policy again in depth
            return messages, self.engine.prepare(messages, policy)

    def check_key(self, headers: Any) -> None:
        if not self.api_key:
            return
        scheme, _, given = (headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer KEY'",
                               "pass api_key= to the client (the key given to qvl launch --api-key)")
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise Unauthorized("the API key is wrong", "use the key given to qvl launch --api-key")


# --- requests -------------------------------------------------------------------------------


class Ticket:
    """Chunks of one job, handed from the scheduler's thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, admission: Any) -> None:
        self.loop = loop
        self.admission = admission
        self.queue: asyncio.Queue = asyncio.Queue()

    def abandon(self, job: QueuedRequest) -> None:
        """The client went away: stop its job and give its place to the next request at once."""
        job.cancel.set()
        self.admission.release()

    def emit(self, item: Any) -> None:
        if item is DONE:
            self.admission.release()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped
            pass

    async def items(self) -> AsyncIterator[Any]:
        while True:
            item = await self.queue.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


async def _read_body(request: Any, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge(f"the request body is {int(length)} bytes, above the limit of {limit}",
                       "send smaller media (or start the server with a larger --max-body-mb)")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise TooLarge(f"the request body is above the limit of {limit} bytes",
                           "send smaller media (or start the server with a larger --max-body-mb)")
        chunks.append(part)
    return b"".join(chunks)


async def _watch_disconnect(request: Any, ticket: Ticket, job: QueuedRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ticket.abandon(job)
            return


async def chat_completions(state: ServerState, request: Any) -> Any:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, StreamingResponse

    started = time.monotonic()
    state.check_key(request.headers)
    scheduler = state.require_ready()
    raw = await _read_body(request, state.config.max_body_bytes)
    chat = api.parse_chat(api.decode_json(raw), state.config)
    admission = scheduler.admit()
    try:
        messages, prepared = await run_in_threadpool(state.prepare, chat)
        ticket = Ticket(asyncio.get_running_loop(), admission)
        job = QueuedRequest(messages, chat.params, prepared, ticket.emit)
        scheduler.submit(job)
    except BaseException:
        admission.release()
        raise
    req_id = api.new_id()
    if chat.stream:
        return StreamingResponse(_events(state, chat, ticket, job, req_id, started),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_watch_disconnect(request, ticket, job))
    answer = Answer()
    try:
        async for chunk in ticket.items():
            answer.add(chunk)
    finally:
        watcher.cancel()
    _log_request(chat, answer, started)
    return JSONResponse(api.completion(req_id, chat.model, answer))


async def _events(state: ServerState, chat: api.ChatRequest, ticket: Ticket, job: QueuedRequest,
                  req_id: str, started: float) -> AsyncIterator[bytes]:
    created, answer, finished = int(time.time()), Answer(), False
    head = api.chunk(req_id, chat.model, created, {"role": "assistant", "content": ""},
                     include_usage=chat.include_usage)
    try:
        yield api.sse(head)
        try:
            async for item in ticket.items():
                answer.add(item)
                if item.text:
                    yield api.sse(api.chunk(req_id, chat.model, created, {"content": item.text},
                                            include_usage=chat.include_usage))
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
            yield api.sse(api.error_body(api.http_error(translate(exc) or exc)))
            yield api.SSE_DONE
            finished = True
            return
        yield api.sse(api.chunk(req_id, chat.model, created, finish_reason=answer.finish_reason,
                                include_usage=chat.include_usage))
        if chat.include_usage and answer.usage is not None:
            yield api.sse(api.chunk(req_id, chat.model, created, usage=answer.usage))
        yield api.SSE_DONE
        finished = True
        _log_request(chat, answer, started)
    finally:
        if not finished:  # the client went away (or the server is stopping)
            ticket.abandon(job)


def _log_request(chat: api.ChatRequest, answer: Answer, started: float) -> None:
    usage = answer.usage
    tokens = f"{usage.prompt_tokens}+{usage.completion_tokens} tokens" if usage else "no tokens"
    log(f"chat {'stream' if chat.stream else 'json'}: {tokens}, {time.monotonic() - started:.2f} s, "
        f"finish {answer.finish_reason}")


# --- the app ----------------------------------------------------------------------------------


def create_app(state: ServerState) -> Any:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    config = state.config

    async def health(request):
        if state.error is not None:
            return JSONResponse({"status": "failed", "error": state.error.message}, 503)
        if state.scheduler is None or state.stopping:
            return JSONResponse({"status": "stopping" if state.stopping else "loading",
                                 "model": config.uid}, 503)
        return JSONResponse({"status": "ok", "model": config.uid, "queue": state.scheduler.stats()})

    async def models(request):
        state.check_key(request.headers)
        return JSONResponse(api.models_list(config, state.created))

    async def model(request):
        state.check_key(request.headers)
        api.check_model(request.path_params["name"], config)
        return JSONResponse(api.models_list(config, state.created)["data"][0])

    async def chat(request):
        return await chat_completions(state, request)

    async def on_http_error(request, exc: HttpError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(api.error_body(exc), exc.status, headers=headers)

    async def on_starlette_error(request, exc: HTTPException):
        err = HttpError(f"{request.method} {request.url.path}: {exc.detail}",
                        "the API lives under /v1: GET /v1/models, POST /v1/chat/completions")
        err.status, err.type = exc.status_code, "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(api.error_body(err), exc.status_code)

    async def on_error(request, exc: Exception):
        err = api.http_error(translate(exc) or exc)
        if err.status >= 500:
            log(f"error: {type(exc).__name__}: {exc}")
        return JSONResponse(api.error_body(err), err.status)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/models/{name:path}", model),
              Route("/v1/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={
        HttpError: on_http_error, HTTPException: on_starlette_error, QvlError: on_error,
        Exception: on_error})


# --- the process ------------------------------------------------------------------------------


def log(message: str) -> None:
    """One line in the server's log (stderr: the log file, or the terminal in --foreground)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} qvl: {message}", file=sys.stderr, flush=True)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line ServerError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot bind to host {host!r}: {exc.strerror}",
                         "use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise ServerError(f"port {port} on {host} is already in use",
                              "pick another with --port, or leave --port out to get a free one") from None
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          "check --host and --port") from None
    return sock


def _gpu_memory(engine: Any) -> int | None:
    return engine.gpu_memory_allocated()

def open_engine(config: ServerConfig, announce: Announce) -> Any:
    """Load the engine a ServerConfig names, warmed up and ready for concurrent requests
    (this server's process, or a replica on a Ray cluster: serve/cluster.py)."""
    from qwenvl_cli.engine.engine import Engine
    from qwenvl_cli.engine.options import EngineOptions

    announce({"event": "status", "message": f"loading the model from {config.model_path}"})
    options = dict(config.engine)
    options["gpu_idx"] = tuple(options["gpu_idx"]) if options.get("gpu_idx") else None
    warmup = options.pop("warmup", False)
    engine = Engine.load(config.model_path, EngineOptions(**options), config.context_length)
    if warmup and engine.decoder.config.step in ("compile", "cuda-graph"):
        announce({"event": "status", "message": f"preparing the decode step ({engine.decoder.config.describe()}; "
                  "once, before serving)"})
        engine.warmup()
    # One tokenization now sets the fast tokenizer's padding state, so that requests
    # prepared concurrently never mutate it (the Rust tokenizer's "Already borrowed").
    engine.prepare([{"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    return engine


def _load(state: ServerState, server: Any, entry: registry.Entry, announce: Announce) -> None:
    config = state.config
    try:
        engine = open_engine(config, announce)
        state.ready(engine)
        registry.update(entry, state=registry.RUNNING, gpu_memory_bytes=_gpu_memory(engine),
                        device=engine.plan.describe())
        warm = f", decode step compiled in {engine.warmup_seconds:.1f} s" if engine.warmup_seconds else ""
        log(f"{config.uid} ready on {entry.endpoint} ({engine.plan.describe()}, {engine.plan.dtype_name}, "
            f"loaded in {engine.load_seconds:.1f} s{warm})")
        announce({"event": "ready", "port": entry.port, "load_seconds": round(engine.load_seconds, 2),
                  "warmup_seconds": round(engine.warmup_seconds, 2),
                  "device": engine.plan.describe(), "dtype": engine.plan.dtype_name})
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, then the process ends
        err = translate(exc) or EngineError(f"the model failed to load: {type(exc).__name__}: "
                                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                                            f"see the log{': ' + config.log_file if config.log_file else ''}")
        state.error = err
        log(f"error: {err.message}")
        if settings.debug():
            import traceback

            traceback.print_exc()
        announce({"event": "error", "message": err.message, "hint": err.hint,
                  "exit_code": getattr(err, "exit_code", 1)})
        server.should_exit = True


def serve(config: ServerConfig, api_key: str | None = None, announce: Announce | None = None) -> int:
    """Bind, register, load, serve until SIGINT / SIGTERM; 0 after a clean stop, else the error's code.

    The registry entry of ``config.uid`` must have been reserved by the caller; it is
    rewritten with this process's pid and removed on the way out.
    """
    import uvicorn

    announce = announce or (lambda event: None)
    state = ServerState(config, api_key)
    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    pid = os.getpid()
    entry = registry.write(registry.Entry(
        uid=config.uid, pid=pid, host=config.host, port=port, spec=config.spec,
        model_path=config.model_path, api_key=bool(api_key), pid_start=registry.process_start(pid),
        log_file=config.log_file, foreground=config.foreground))
    announce({"event": "bound", "port": port, "pid": pid})

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Unlike uvicorn's, this does not re-raise the signal after the shutdown, so the
            # registry entry is removed and the exit status says "clean stop".
            if not state.stopping:
                log(f"{signal.Signals(sig).name}: stopping")
            state.stop()
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True

    uv_config = uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                               lifespan="off", timeout_graceful_shutdown=5, timeout_keep_alive=30)
    server = Server(uv_config)
    threading.Thread(target=_load, args=(state, server, entry, announce), name="qvl-load",
                     daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        state.stop()
        if state.scheduler is not None:
            state.scheduler.close(timeout=5)
        registry.remove(config.uid, pid)
        sock.close()
    return getattr(state.error, "exit_code", 1) if state.error is not None else 0


def _announcer(fd: int) -> Announce:
    """JSON lines on the launcher's pipe; once the launcher has gone, nothing."""
    stream = os.fdopen(fd, "w", buffering=1) if fd >= 0 else None
    lock = threading.Lock()

    def announce(event: dict[str, Any]) -> None:
        nonlocal stream
        if event.get("event") == "status":
            log(event["message"])
        with lock:
            if stream is None:
                return
            try:
                stream.write(json.dumps(event) + "\n")
                if event.get("event") in ("ready", "error"):
                    stream.close()  # the launcher stops listening after this
                    stream = None
            except (OSError, ValueError):
                stream = None

    return announce


def main() -> int:
    """``python -m qwenvl_cli.serve.server``: the background process started by `qvl launch`."""
    config = ServerConfig.from_json(os.environ.pop("QVL_SERVER_CONFIG"))
    announce = _announcer(int(os.environ.pop("QVL_STATUS_FD", "-1")))
    try:
        return serve(config, settings.api_key(), announce)
    except QvlError as exc:
        log(f"error: {exc.message}")
        announce({"event": "error", "message": exc.message, "hint": exc.hint,
                  "exit_code": exc.exit_code})
        return exc.exit_code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is cleaned up: skip the interpreter's teardown of torch (about 2 s).
    os._exit(code)
