"""`qvl batch --cluster`: the same requests answered by a pool of engine actors on a Ray cluster.

The driver (this process) does what `qvl batch` always does first: checks the flags and the
whole input, locks the output, skips the ids answered before, writes the bad lines' error
records. What is left goes to Ray Data as rows of pickled :class:`~qwenvl_cli.batch.files.Request`
values; ``map_batches`` runs them through an actor pool of :class:`EngineActor` (one engine each,
one per CPU, or per GPU where the cluster has GPUs), and each actor runs them through
:func:`qwenvl_cli.batch.local.run`, exactly as a local run does (media loaded and the prompt
tokenized on threads ahead of the decoder, failed batches halved). Records come back as they
finish and are appended by the driver, so a killed run resumes where it stopped.

Media paths in the input must be readable from every node (a shared path, or URLs).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwenvl_cli.batch.files import Request

Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Job:
    """What every actor needs to load the model (picklable)."""

    spec: Any  # ResolvedSpec | None
    model_path: str | None
    options: Any  # EngineOptions
    revision: str | None
    offline: bool
    force: bool
    query: Any  # SpecQuery: the fit check again, on each actor's node
    batch_size: int
    env: dict[str, str]


class EngineActor:
    """One engine on one node; ``__call__`` answers a block of requests."""

    job: Job  # set on the subclass made for one run (see run: no constructor arguments to keep)

    def __init__(self) -> None:
        from qwenvl_cli.backend.local import LocalRequest, load_engine
        from qwenvl_cli.fit.preflight import check_spec

        job = self.job
        os.environ.update(job.env)
        if job.model_path is None:
            check_spec(job.query, device=job.options.device, force=job.force, quiet=True)
        self.engine, _name = load_engine(LocalRequest(job.spec, job.model_path, job.revision, job.offline,
                                                      quiet=True), job.options)
        self.batch_size = job.batch_size

    def __call__(self, rows: dict[str, Any]) -> dict[str, list[str]]:
        from qwenvl_cli.batch import local as batch_local
        from qwenvl_cli.batch import plan as batch_plan

        requests = [pickle.loads(blob) for blob in rows["request"]]
        records: list[dict[str, Any]] = []
        batch_local.run(self.engine, batch_plan.plan_batches(requests, self.batch_size), records.append)
        return {"record": [json.dumps(record) for record in records]}


def pool_size(ray: Any, gpus_per_actor: float) -> tuple[int, dict[str, float]]:
    """(actors, resources of one): one per GPU group where the cluster has GPUs, else one per CPU."""
    resources = ray.cluster_resources()
    if gpus_per_actor and resources.get("GPU"):
        return max(1, int(resources["GPU"] // gpus_per_actor)), {"num_gpus": gpus_per_actor, "num_cpus": 1}
    return max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}


def run(address: str, spec: Any, options: Any, command: Any, requests: list[Request], size: int, emit: Emit) -> None:
    """Answer ``requests`` on the cluster, emitting each record here as it comes back."""
    from qwenvl_cli.serve.cluster import connect, forwarded_env

    ray = connect(address)
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # qvl's own bar counts the records
    context.print_on_execution_start = False
    gpus = float(options.n_gpu or 1) if options.device != "cpu" else 0.0
    actors, resources = pool_size(ray, gpus)
    job = Job(spec, command.model_path, options, command.revision, command.offline, command.force, command.query,
              size, forwarded_env())
    actors = min(actors, max(1, -(-len(requests) // size)))
    rows = [{"request": pickle.dumps(request)} for request in requests]
    data = ray.data.from_items(rows, override_num_blocks=min(len(rows), actors * 8))
    # The job travels inside the class, not as constructor arguments in the object store
    # (which a restarted actor could find gone).
    actor = type("EngineActor", (EngineActor,), {"job": job})
    answers = data.map_batches(actor, batch_size=size, batch_format="numpy",
                               compute=ray.data.ActorPoolStrategy(size=actors),
                               runtime_env={"env_vars": job.env}, **resources)
    for row in answers.iter_rows():
        emit(json.loads(row["record"]))
