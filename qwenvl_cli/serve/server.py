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
from qwenvl_cli.serve.lifecycle import Ticket, cut_line, watch_disconnect
from qwenvl_cli.serve.scheduler import QueuedRequest, Scheduler

Announce = Callable[[dict[str, Any]], None]
PREPARE_SLOTS = 2  # requests decoding media / tokenizing at once, beside the running one
FETCH_SLOTS = 4  # requests fetching remote media at once; they hold no preparation slot meanwhile


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
        self.fetch_slots = threading.BoundedSemaphore(FETCH_SLOTS)
        self.on_fatal: Callable[[], None] = lambda: None  # serve() sets it: stop the process
        from qwenvl_cli.serve.metrics import Metrics

        self.metrics = Metrics(config.uid)

    def ready(self, engine: Any) -> None:
        self.engine = engine
        self.scheduler = Scheduler(engine, self.config.max_queue, self.config.max_batch,
                                   on_failure=self.scheduler_failed)

    def scheduler_failed(self, exc: BaseException) -> None:
        """The scheduler's loop died: /health turns 503 and the process exits non-zero."""
        self.error = ServerError(f"the scheduler stopped: {type(exc).__name__}: {exc}",
                                 "restart the model (qvl launch); the log has the details")
        log(f"error: {self.error.message}; stopping with exit status 1")
        self.stopping = True
        self.on_fatal()

    def serving(self) -> bool:
        return self.scheduler is not None and self.error is None and not self.stopping

    def require_ready(self) -> Scheduler:
        if self.error is not None:
            raise Unavailable(f"the server has failed: {self.error.message}", "retry on a restarted server")
        if self.stopping:
            raise Unavailable("the server is shutting down", "retry on another server")
        if self.scheduler is None:
            raise Unavailable("the model is still loading", "retry in a moment (GET /health says when it is ready)")
        return self.scheduler

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.scheduler is not None:
            threading.Thread(target=self.scheduler.close, kwargs={"grace": self.config.shutdown_grace},
                             daemon=True).start()

    def prepare(self, chat: api.ChatRequest) -> tuple[list[dict[str, Any]], Any]:
        """Check and decode the media with the server's policy, then tokenize and check the
        token budget (a worker thread). A cluster's ingress (serve/cluster.py) leaves this to
        the engine replica.

        Fetching remote media holds a fetch slot, not a preparation slot, so requests that need
        no fetch (text, inline data) pass the ones waiting on a slow server."""
        import contextlib

        from qwenvl_cli.serve.media import RequestMedia, needs_fetch, policy_for

        policy = policy_for(self.config)
        self.engine.validate(chat.params)  # logit_bias ids, response_format's schema (compiled once)
        if chat.prompt is not None:  # /v1/completions
            from qwenvl_cli.engine.prompts import prepare_text

            with self.prepare_slots:
                messages, prepared = [], prepare_text(self.engine, chat.prompt)
        else:
            fetching = self.fetch_slots if needs_fetch(chat.messages) else contextlib.nullcontext()
            with RequestMedia(policy) as media:
                with fetching:
                    messages = media.resolve(chat.messages)  # checked sources; the policy again in depth
                with self.prepare_slots, media.scrubbed():
                    prepared = self.engine.prepare(messages, policy)
        api.check_budget(chat.params, prepared.prompt_tokens, self.engine.context_length)
        return messages, prepared

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


async def answer(state: ServerState, request: Any, parse: Callable[[Any, ServerConfig], api.ChatRequest],
                 shape: Callable[[str, api.ChatRequest], Any]) -> Any:
    """One generation request: parse, prepare, queue, answer whole or streamed in ``shape``
    (formats.ChatFormat, CompletionFormat or ResponsesFormat)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, StreamingResponse

    started = time.monotonic()
    state.check_key(request.headers)
    scheduler = state.require_ready()
    raw = await _read_body(request, state.config.max_body_bytes)
    chat = parse(api.decode_json(raw), state.config)
    admission = scheduler.admit()
    try:
        messages, prepared = await run_in_threadpool(state.prepare, chat)
        ticket = Ticket(asyncio.get_running_loop(), admission, scheduler)
        job = QueuedRequest(messages, chat.params, prepared, ticket.emit)
        scheduler.submit(job)
    except BaseException:
        admission.release()
        raise
    fmt = shape(api.new_id(), chat)
    if chat.stream:
        return StreamingResponse(_events(state, chat, ticket, job, fmt, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(watch_disconnect(request, ticket, job))
    answers = [Answer() for _ in range(chat.params.n)]
    try:
        async for chunk in ticket.items():
            answers[chunk.index].add(chunk)
    except Exception as exc:
        log(cut_line("json", api.http_error(translate(exc) or exc).message, answers[0]))
        raise
    finally:
        watcher.cancel()
    if watcher.done() and not watcher.cancelled():
        log(cut_line("json", "the client disconnected", answers[0]))
    _log_request(chat, answers[0], started)
    state.metrics.finished(answers, started)
    return JSONResponse(fmt.body(answers))


async def _events(state: ServerState, chat: api.ChatRequest, ticket: Ticket, job: QueuedRequest, fmt: Any,
                  started: float) -> AsyncIterator[bytes]:
    answers, finished = [Answer() for _ in range(chat.params.n)], False
    try:
        for event in fmt.head():
            yield api.sse(event)
        try:
            async for item in ticket.items():
                answers[item.index].add(item)
                if item.text or item.logprobs:
                    for event in fmt.delta(item):
                        yield api.sse(event)
                if item.finish_reason is not None:
                    for event in fmt.finish(item):
                        yield api.sse(event)
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
            err = api.http_error(translate(exc) or exc)
            log(cut_line("stream", err.message, answers[0]))
            # The shape vLLM and OpenAI send for a stream that fails, and no [DONE] after it:
            # a client must not take the text so far for a whole answer.
            yield api.sse(api.error_body(err))
            finished = True
            return
        for event in fmt.end(answers):
            yield api.sse(event)
        if fmt.done_marker:
            yield api.SSE_DONE
        finished = True
        _log_request(chat, answers[0], started)
        state.metrics.finished(answers, started)
    finally:
        if not finished:  # the client went away (or the server is stopping)
            log(cut_line("stream", "the client disconnected", answers[0]))
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

    from qwenvl_cli.serve import formats, middleware
    from qwenvl_cli.serve.metrics import CONTENT_TYPE as METRICS_TYPE

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
        state.require_ready()  # 503 until the model can answer, as vLLM's readiness polls expect
        return JSONResponse(api.models_list(config, state.created))

    async def model(request):
        state.check_key(request.headers)
        state.require_ready()
        api.check_model(request.path_params["name"], config)
        return JSONResponse(api.models_list(config, state.created)["data"][0])

    async def chat(request):
        return await answer(state, request, api.parse_chat, formats.ChatFormat)

    async def completions(request):
        return await answer(state, request, formats.parse_completion, formats.CompletionFormat)

    async def responses(request):
        return await answer(state, request, formats.parse_responses, formats.ResponsesFormat)

    async def metrics(request):
        from starlette.responses import Response

        stats = state.scheduler.stats() if state.scheduler is not None else None
        return Response(state.metrics.scrape(stats), media_type=METRICS_TYPE)

    async def on_http_error(request, exc: HttpError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(api.error_body(exc), exc.status, headers=headers)

    async def on_starlette_error(request, exc: HTTPException):
        err = HttpError(f"{request.method} {request.url.path}: {exc.detail}",
                        "the API lives under /v1: GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/responses")
        err.status, err.type = exc.status_code, "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(api.error_body(err), exc.status_code)

    async def on_error(request, exc: Exception):
        err = api.http_error(translate(exc) or exc)
        if err.status >= 500:
            log(f"error: {type(exc).__name__}: {exc}")
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None  # e.g. out of memory
        return JSONResponse(api.error_body(err), err.status, headers=headers)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/models/{name:path}", model),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/responses", responses, methods=["POST"]), Route("/metrics", metrics)]
    app = Starlette(routes=routes, exception_handlers={
        HttpError: on_http_error, HTTPException: on_starlette_error, QvlError: on_error,
        Exception: on_error})
    return middleware.wrap(app, config.allowed_origins)


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
    from qwenvl_cli.engine.choose import engine_class
    from qwenvl_cli.engine.options import EngineOptions

    announce({"event": "status", "message": f"loading the model from {config.model_path}"})
    options = dict(config.engine)
    options["gpu_idx"] = tuple(options["gpu_idx"]) if options.get("gpu_idx") else None
    warmup = options.pop("warmup", False)
    engine_options = EngineOptions(**options)
    engine = engine_class(engine_options).load(config.model_path, engine_options, config.context_length)
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

    from qwenvl_cli.serve.protocol import openai_h11_protocol

    # uvicorn's own grace outlasts the scheduler's, so cut answers still reach their clients.
    uv_config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                               timeout_graceful_shutdown=config.shutdown_grace + 5, timeout_keep_alive=30,
                               http=openai_h11_protocol())
    server = Server(uv_config)

    def fatal() -> None:
        server.should_exit = True

    state.on_fatal = fatal
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
