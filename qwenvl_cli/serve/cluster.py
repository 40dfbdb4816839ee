"""`qvl launch --cluster`: qvl's server as a Ray Serve application on an existing Ray cluster.

One application per model UID, of two deployments:

- ``QvlEngine``: ``--replicas N`` (or ``--autoscale MIN:MAX``) replicas, each one engine with
  its own scheduler (:class:`~qwenvl_cli.serve.server.ServerState`). A replica checks the fit
  against its node's GPUs (:func:`~qwenvl_cli.fit.preflight.check_spec`), downloads through
  :func:`~qwenvl_cli.hub.download.ensure_local` into that node's cache (or ``--cache-dir``),
  loads with :func:`~qwenvl_cli.serve.server.open_engine`, and answers ``generate``: the
  request's media checked and decoded under the server's media rules, then the chunks.
- ``QvlIngress``: one light replica on the head running qvl's own HTTP app
  (:func:`~qwenvl_cli.serve.server.create_app`: the same routes, API key, body limit, request
  parsing, JSON and SSE responses as `qvl launch`), which hands each request to an engine
  replica through a Serve handle. A replica that dies mid-request turns into qvl's 503
  ("retry"), in the JSON body or as the stream's error event, never a hang; Ray replaces it.

The engine is a parameter (``ServerConfig.engine``): a vLLM replica drops in by loading a
different engine in :meth:`EngineReplica.__init__`. Ray is imported only inside functions.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from dataclasses import dataclass, replace
from typing import Any

from qwenvl_cli.errors import ServerError, UsageError
from qwenvl_cli.serve import api, registry
from qwenvl_cli.serve.api import Busy, ServerConfig, Unavailable

ENGINE, INGRESS = "QvlEngine", "QvlIngress"
# Settings a replica takes from the launching shell (where models come from); caches and
# tokens stay each node's own.
FORWARD_ENV = ("HF_ENDPOINT", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN", "QVL_DOWNLOAD_HUB",
               "QVL_HUB_TIMEOUT", "QVL_RETRY_BACKOFF", "HF_HUB_OFFLINE")
DEPLOY_TIMEOUT = 600.0


@dataclass(frozen=True)
class Deployment:
    """What `qvl launch --cluster` deploys (picklable: it travels to every replica)."""

    address: str
    config: ServerConfig  # model_path: a folder every node sees (--model-path), or "" to download
    spec: Any = None  # ResolvedSpec | None
    query: Any = None  # SpecQuery: the fit check again, on each replica's node
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    cache_dir: str | None = None
    revision: str | None = None
    offline: bool = False
    force: bool = False
    gpus: float = 0  # per replica


def parse_autoscale(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    if sep and lo.strip().isdigit() and hi.strip().isdigit() and 0 < int(lo) <= int(hi):
        return int(lo), int(hi)
    raise UsageError(f"--autoscale {value!r}: expected MIN:MAX with 1 <= MIN <= MAX", "e.g. --autoscale 1:4")


def plan(address: str, config: ServerConfig, spec: Any, query: Any, *, replicas: int = 1,
         autoscale: str | None = None, cache_dir: str | None = None, revision: str | None = None,
         offline: bool = False, force: bool = False) -> Deployment:
    """The command line -> a Deployment (``config`` from launcher.cluster_config). The fit
    check and the download happen on each replica's node, against its GPUs, into its cache."""
    bounds = parse_autoscale(autoscale)
    if config.model_path and cache_dir is not None:
        raise UsageError("--cache-dir is where replicas download: it does not apply with --model-path",
                         "drop one of them")
    engine = config.engine
    gpus = float(engine.get("n_gpu") or 0) if engine.get("device") != "cpu" else 0.0
    return Deployment(address, config, spec, query, 1 if bounds else replicas, bounds, cache_dir,
                      revision, offline, force, gpus)


def forwarded_env(cache_dir: str | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    if cache_dir:
        env.update(HF_HOME=os.path.join(cache_dir, "huggingface"),
                   MODELSCOPE_CACHE=os.path.join(cache_dir, "modelscope"))
    return env


def connect(address: str) -> Any:
    """``ray.init`` on the cluster at HOST:PORT, or a one-line ServerError (probed first, so
    a wrong address fails in seconds)."""
    import ray

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--cluster {address!r}: expected HOST:PORT of the Ray head (GCS)",
                         "e.g. --cluster 10.0.0.5:6379 (what `ray start --head` printed)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ServerError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}",
                          "start one with `ray start --head` (see docs/cluster.md), or check the address") from None
    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    quiet_ray()
    return ray


def quiet_ray() -> None:
    """qvl reports progress and errors itself: Ray's driver-side loggers to errors only."""
    import logging

    for name in ("ray", "ray.serve", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0))


# --- the replicas ------------------------------------------------------------------------


class EngineReplica:
    """One engine on one node (a QvlEngine replica)."""

    def __init__(self, plan: Deployment) -> None:
        from qwenvl_cli.serve.server import ServerState, log, open_engine

        os.environ.update(forwarded_env(plan.cache_dir))
        config = plan.config
        if not config.model_path:
            config = replace(config, model_path=str(_fetch(plan)))
        else:  # --model-path: a folder every node has; check this node's copy is complete
            from qwenvl_cli.hub.download import local_model_from_path

            local_model_from_path(config.model_path)
        self.tag = f"{socket.gethostname()}:{os.getpid()}"
        try:
            import ray

            self.tag = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        except Exception:  # noqa: BLE001 - only a label
            pass
        self.state = ServerState(config, None)
        self.state.ready(open_engine(config, lambda event: log(event.get("message", ""))))
        log(f"{config.uid} replica {self.tag} ready ({self.state.engine.plan.describe()})")

    async def generate(self, messages: list[dict[str, Any]], params: Any):
        """The request's media under the server's rules, then its chunks; first item: this
        replica's tag (the ingress counts requests per replica)."""
        from qwenvl_cli.serve.scheduler import QueuedRequest
        from qwenvl_cli.serve.lifecycle import Ticket

        scheduler = self.state.require_ready()
        admission = scheduler.admit()
        try:
            chat = api.ChatRequest(self.state.config.uid, messages, params)
            messages, prepared = await asyncio.to_thread(self.state.prepare, chat)
            ticket = Ticket(asyncio.get_running_loop(), admission, scheduler)
            job = QueuedRequest(messages, params, prepared, ticket.emit)
            scheduler.submit(job)
        except BaseException:
            admission.release()
            raise
        finished = False
        try:
            yield {"replica": self.tag}
            async for item in ticket.items():
                yield item
            finished = True
        finally:
            if not finished:
                ticket.abandon(job)

    def check_health(self) -> None:
        if self.state.error is not None or self.state.stopping:
            raise RuntimeError("the engine stopped")

    def info(self) -> dict[str, Any]:
        return {"replica": self.tag, "queue": self.state.scheduler.stats(),
                "device": self.state.engine.plan.describe()}


def _fetch(plan: Deployment) -> Any:
    """This node's fit check, then the files into this node's cache (or --cache-dir)."""
    from qwenvl_cli.fit.preflight import check_spec
    from qwenvl_cli.hub import download as hub

    engine = plan.config.engine
    check_spec(plan.query, gpu_idx=None, device=engine.get("device", "auto"), force=plan.force, quiet=True)
    return hub.ensure_local(plan.spec, revision=plan.revision, offline=True if plan.offline else None,
                            quiet=True).path


class _Admission:
    def __init__(self, owner: RemoteScheduler) -> None:
        self.owner, self.done = owner, False

    def release(self) -> None:
        with self.owner.lock:
            if not self.done:
                self.done = True
                self.owner.pending -= 1


class RemoteScheduler:
    """The ingress's stand-in for :class:`~qwenvl_cli.serve.scheduler.Scheduler`: admission
    (429 past --max-queue) and each job forwarded to an engine replica through the handle."""

    def __init__(self, handle: Any, max_pending: int) -> None:
        self.handle, self.max_pending = handle, max_pending
        self.pending, self.served = 0, {}
        self.lock = threading.Lock()

    def admit(self) -> _Admission:
        with self.lock:
            if self.pending >= self.max_pending:
                raise Busy(f"{self.pending} requests are in flight (the limit is {self.max_pending})",
                           "retry in a moment, or launch with more --replicas / a larger --max-queue")
            self.pending += 1
        return _Admission(self)

    def submit(self, job: Any) -> None:
        asyncio.get_running_loop().create_task(self._forward(job))

    async def _forward(self, job: Any) -> None:
        from qwenvl_cli.serve.scheduler import DONE

        response = self.handle.options(stream=True).generate.remote(job.messages, job.params)
        try:
            async for item in response:
                if job.cancel.is_set():
                    response.cancel()
                    break
                if isinstance(item, dict):
                    with self.lock:
                        self.served[item["replica"]] = self.served.get(item["replica"], 0) + 1
                    continue
                job.emit(item)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the request's error
            job.emit(_replica_error(exc))
        job.emit(DONE)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"in_flight": self.pending, "max_queue": self.max_pending, "served_by": dict(self.served)}

    def discard(self, job: Any) -> None:
        """The client went away: stop forwarding its chunks (the replica's stream is cancelled)."""
        job.cancel.set()

    def close(self, timeout: float = 0, grace: float = 0) -> None:
        pass


def _replica_error(exc: BaseException) -> BaseException:
    """What a request's client sees when its replica failed: the replica's own QvlError
    (e.g. a media rule, 400), or 503 when the replica died or is unreachable."""
    from ray import exceptions as rex

    cause = getattr(exc, "cause", None)
    if isinstance(exc, rex.RayTaskError) and isinstance(cause, Exception):
        return cause
    if isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError)) or "died" in str(exc).lower():
        return Unavailable("the replica answering this request stopped", "retry: Ray is replacing it")
    return Unavailable(f"the cluster could not answer: {type(exc).__name__}", "retry in a moment")


class Ingress:
    """qvl's HTTP app on the cluster (the QvlIngress deployment)."""

    def __init__(self, config: ServerConfig, api_key: str | None, engine: Any) -> None:
        from qwenvl_cli.serve.server import ServerState

        self.state = ServerState(config, api_key)
        self.state.scheduler = RemoteScheduler(engine, config.max_queue)
        self.state.engine = engine
        self.state.prepare = lambda chat: (chat.messages, None)  # media: on the engine replica

    def __serve_build_asgi_app__(self) -> Any:
        from qwenvl_cli.serve.server import create_app

        return create_app(self.state)


# --- launch, list, terminate -------------------------------------------------------------


def launch(plan: Deployment, api_key: str | None, quiet: bool = False,
           timeout: float = DEPLOY_TIMEOUT) -> registry.Entry:
    """Deploy the application, wait until every replica answers (or the first failure),
    record it in the registry; a failed deploy is deleted again, leaving nothing behind."""
    from qwenvl_cli import render

    config = plan.config  # its UID checked free by launcher.cluster_config
    ray = connect(plan.address)
    from ray import serve

    on_cpu = plan.config.engine.get("device") == "cpu"
    plan = replace(plan, gpus=plan.gpus if plan.gpus or on_cpu or not cluster_gpus(ray) else 1)
    quiet_ray()
    serve.start(proxy_location="HeadOnly", http_options={"host": config.host, "port": config.port or 8000})
    quiet_ray()  # Serve sets its driver logger up when it starts
    serve._run(_application(plan, api_key), _blocking=False, name=config.uid, route_prefix=f"/{config.uid}")
    count = f"{plan.autoscale[0]}..{plan.autoscale[1]}" if plan.autoscale else str(plan.replicas)
    if not quiet:
        render.status(f"deploying {config.uid} on {plan.address}: {count} replica(s), "
                      f"{plan.gpus:g} GPU(s) each")
    try:
        _wait_running(serve, config.uid, timeout)
    except BaseException:
        _delete(serve, config.uid)
        raise
    host, port = _http_address(serve, config)
    return registry.write(registry.Entry(
        uid=config.uid, pid=0, host=host, port=port, state=registry.RUNNING, spec=config.spec,
        model_path=config.model_path or "(each node's cache)", api_key=bool(api_key),
        cluster=plan.address, route=f"/{config.uid}", device=f"ray: {count} replica(s)"))


def _application(plan: Deployment, api_key: str | None) -> Any:
    from ray import serve

    config = plan.config
    env = {"env_vars": forwarded_env(plan.cache_dir)}
    scale: dict[str, Any] = {"num_replicas": plan.replicas}
    if plan.autoscale:
        scale = {"autoscaling_config": {"min_replicas": plan.autoscale[0], "max_replicas": plan.autoscale[1],
                                        "target_ongoing_requests": max(1, config.max_batch)}}
    engine = serve.deployment(
        name=ENGINE, ray_actor_options={"num_cpus": 1, "num_gpus": plan.gpus, "runtime_env": env},
        max_ongoing_requests=config.max_queue, health_check_period_s=2, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5, **scale)(EngineReplica).bind(plan)
    ingress = serve.deployment(
        name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0, "runtime_env": env},
        max_ongoing_requests=4 * config.max_queue)(serve.ingress()(Ingress))
    return ingress.bind(config, api_key, engine)


def _wait_running(serve: Any, uid: str, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        app = serve.status().applications.get(uid)
        status = str(getattr(app, "status", "")).rsplit(".", 1)[-1]
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            details = [d.message for d in (app.deployments or {}).values() if getattr(d, "message", "")]
            raise ServerError(f"the replicas failed to start: {_reason(chr(10).join([app.message, *details]))}",
                              "see the replica logs under the head node's /tmp/ray/session_latest/logs/serve/")
        if time.monotonic() > deadline:
            raise ServerError(f"{uid} was not running on the cluster within {timeout:g} s",
                              "check that the cluster has the CPUs / GPUs the replicas ask for (`ray status`)")
        time.sleep(0.5)


def _reason(message: str) -> str:
    """The useful line of a replica's failure (its QvlError's message, not Ray's traceback)."""
    import re

    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    for line in reversed(lines):
        found = re.search(r"qwenvl_cli\.[\w.]+\.\w+: (.+)", line)
        if found:
            return found.group(1)[:300]
    for line in reversed(lines):
        if "Error:" in line and not line.startswith("File "):
            return line.split("Error: ", 1)[-1][:300]
    return (lines[-1] if lines else "unknown reason")[:300]


def _http_address(serve: Any, config: ServerConfig) -> tuple[str, int]:
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return http.host or config.host, int(http.port)


def _delete(serve: Any, uid: str) -> None:
    """Remove the application; when no other is left, shut Serve down (its controller and
    proxy), so the cluster is as it was."""
    serve.delete(uid, _blocking=True)
    if not serve.status().applications:
        serve.shutdown()


def health(entry: registry.Entry) -> dict[str, Any]:
    """The application's status and its replicas (state, node, pid) from the cluster."""
    ray = connect(entry.cluster)
    from ray import serve

    app = serve.status().applications.get(entry.uid)
    if app is None:
        return {"status": "GONE", "replicas": []}
    dep = app.deployments.get(ENGINE)
    states = {str(k).rsplit(".", 1)[-1]: v for k, v in (dep.replica_states or {}).items()} if dep else {}
    return {"status": str(app.status).rsplit(".", 1)[-1], "replica_states": states,
            "replicas": _replica_actors(ray, entry.uid)}


def _replica_actors(ray: Any, uid: str) -> list[dict[str, Any]]:
    from ray._private import state as ray_state

    nodes = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()}
    out = []
    for actor in ray_state.actors().values():
        name = actor.get("Name") or ""
        if actor.get("State") != "ALIVE" or f"{uid}#{ENGINE}" not in name:
            continue
        address = actor.get("Address") or {}
        out.append({"name": name, "pid": actor.get("Pid"), "state": "ALIVE",
                    "node": nodes.get(address.get("NodeID")) or address.get("IPAddress")})
    return out


def terminate(entry: registry.Entry) -> str:
    ray = connect(entry.cluster)
    from ray import serve

    del ray
    _delete(serve, entry.uid)
    registry.remove(entry.uid)
    return "removed from the cluster"
