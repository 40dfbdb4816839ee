"""`qvl launch`, `qvl list` and `qvl terminate`: models served in the background."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from qwenvl_cli import render
from qwenvl_cli.cli.options import (
    AllowedOrigins,
    AllowLocalMedia,
    AllowMediaDomains,
    AllowRemoteMedia,
    ApiKey,
    Attn,
    Autoscale,
    CacheDir,
    Cluster,
    Compile,
    ContextLength,
    DecodeLoop,
    Device,
    DownloadHub,
    Dtype,
    EnforceEager,
    Force,
    Foreground,
    GpuIdx,
    GpuMemoryUtilization,
    GpuPreprocess,
    Host,
    JsonOutput,
    MaxBatch,
    MaxBodyMb,
    MaxMemory,
    MaxModelLen,
    MaxPixels,
    MaxQueue,
    ModelEngine,
    ModelFormat,
    ModelName,
    ModelPath,
    ModelUid,
    NGpu,
    Offline,
    PipelineParallel,
    Port,
    Quantization,
    Quiet,
    RayAddress,
    Replicas,
    Revision,
    ShutdownGrace,
    SizeInBillions,
    StaticCache,
    engine_options,
    examples,
)
from qwenvl_cli.errors import UsageError


def launch(
    model_name: ModelName = None, model_engine: ModelEngine = None, size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None, quantization: Quantization = None, download_hub: DownloadHub = None,
    model_path: ModelPath = None, revision: Revision = None, offline: Offline = False,
    device: Device = "auto", gpu_idx: GpuIdx = None, n_gpu: NGpu = None, max_memory: MaxMemory = None,
    dtype: Dtype = "auto", attn: Attn = "auto", compile_mode: Compile = "auto", static_cache: StaticCache = "auto",
    decode_loop: DecodeLoop = "auto", gpu_preprocess: GpuPreprocess = "auto",
    pipeline_parallel: PipelineParallel = None, gpu_memory_utilization: GpuMemoryUtilization = None,
    max_model_len: MaxModelLen = None, enforce_eager: EnforceEager = False, ray_address: RayAddress = None,
    context_length: ContextLength = None, max_pixels: MaxPixels = None, force: Force = False,
    model_uid: ModelUid = None, host: Host = "127.0.0.1", port: Port = None, api_key: ApiKey = None,
    foreground: Foreground = False, allow_local_media: AllowLocalMedia = None,
    allow_remote_media: AllowRemoteMedia = False, allow_media_domains: AllowMediaDomains = None,
    shutdown_grace: ShutdownGrace = 5.0, max_queue: MaxQueue = 32, max_batch: MaxBatch = 8,
    max_body_mb: MaxBodyMb = 64, allowed_origins: AllowedOrigins = None, quiet: Quiet = False,
    json_output: JsonOutput = False,
    cluster: Cluster = None, replicas: Replicas = 1, autoscale: Autoscale = None, cache_dir: CacheDir = None,
) -> None:
    """Start a model as an OpenAI-compatible server in the background and print its endpoint."""
    from dataclasses import asdict

    from qwenvl_cli.serve import launcher

    launcher.check_cluster_flags(cluster, replicas, autoscale, cache_dir)  # before anything else
    from qwenvl_cli.catalogue.resolve import SpecQuery
    from qwenvl_cli.fit import memory
    from qwenvl_cli.serve.middleware import parse_origins

    origins = parse_origins(allowed_origins or [])
    key = launcher.default_api_key(api_key)
    launcher.warn_exposed(host, key)
    engine = engine_options(device, gpu_idx, n_gpu, max_memory, dtype, attn, decode_loop, compile_mode,
                            static_cache, gpu_preprocess, warmup=True,
                            model_engine=model_engine, model_format=model_format, pipeline_parallel=pipeline_parallel,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            enforce_eager=enforce_eager, ray_address=ray_address)
    query = SpecQuery(model_name, model_engine, size_in_billions, model_format, quantization, download_hub)
    serving = dict(context_length=context_length, max_pixels=max_pixels, allow_local_media=allow_local_media,
                   allow_remote_media=allow_remote_media, max_queue=max_queue, max_batch=max_batch,
                   max_body_bytes=max_body_mb * 2**20)
    show = (lambda entry: render.print_json(entry.to_dict())) if json_output else _show_launched
    if cluster:
        return show(_launch_on_cluster(cluster, query, model_path, asdict(engine), model_uid, host, port, serving,
                                       key, dict(replicas=replicas, autoscale=autoscale, cache_dir=cache_dir,
                                                 revision=revision, offline=offline, force=force), quiet))
    launcher.check_port_free(host, port)
    choice = launcher.choose_model(query, model_path, memory.workload(context_length, max_pixels), gpu_idx, force,
                                   model_uid, revision, offline, quiet, device)
    config = launcher.server_config(
        choice, asdict(engine), host, port, **serving, allow_media_domains=tuple(allow_media_domains or ()),
        shutdown_grace=shutdown_grace, foreground=foreground, allowed_origins=origins)
    if foreground:
        raise typer.Exit(launcher.run_foreground(config, key, on_ready=show))
    show(launcher.start(config, key, quiet))


def _launch_on_cluster(address, query, model_path, engine, uid, host, port, serving, key, placement, quiet):
    """`qvl launch --cluster`: the model as a Ray Serve application (serve/cluster.py)."""
    from qwenvl_cli.serve import cluster as ray_cluster
    from qwenvl_cli.serve import launcher

    config, spec = launcher.cluster_config(query, model_path, engine, uid, host, port, **serving)
    return ray_cluster.launch(ray_cluster.plan(address, config, spec, query, **placement), key, quiet)


def _show_launched(entry) -> None:
    from qwenvl_cli.serve import launcher

    render.key_values(launcher.summary(entry), title=f"{entry.uid} is running")
    typer.echo("\n" + launcher.examples(entry))


def list_models(json_output: JsonOutput = False) -> None:
    """List the models started with `qvl launch` that are running."""
    from qwenvl_cli.serve import launcher, registry

    entries = registry.entries()
    if json_output:
        render.print_json([launcher.listing(e) for e in entries])
    elif not entries:
        render.status("no launched model is running; start one with `qvl launch -s 2`")
    else:
        render.table(["uid", "spec", "endpoint", "pid", "uptime", "state", "GPU memory"],
                     launcher.rows(entries))


def terminate(
    model_uid: Annotated[Optional[str], typer.Argument(metavar="UID", help="The model to stop.",
                                                       show_default=False)] = None,
    uid_option: Annotated[Optional[str], typer.Option(
        "--model-uid", "-u", metavar="UID", help="The model to stop (Xinference's spelling of UID).",
        show_default=False)] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Stop every launched model.")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0, help="Seconds to wait for a clean stop before killing it.")] = 10.0,
) -> None:
    """Stop a launched model (SIGTERM, then SIGKILL after --timeout) and forget it."""
    from qwenvl_cli.serve import launcher, registry

    if model_uid is not None and uid_option is not None and model_uid != uid_option:
        raise UsageError(f"two model UIDs given: {model_uid} and --model-uid {uid_option}",
                         "give the UID once, as an argument or with --model-uid / -u")
    model_uid = model_uid if model_uid is not None else uid_option
    if all_models == (model_uid is not None):
        raise UsageError("give either a model UID or --all", "see the running models with `qvl list`")
    targets = registry.entries() if all_models else [registry.find(model_uid)]
    if not targets:
        render.status("no launched model is running")
    for entry in targets:
        outcome = launcher.terminate(entry, timeout)
        render.status(f"{entry.uid}: {outcome} (pid {entry.pid})")


def register(app: typer.Typer) -> None:
    app.command(epilog=examples(
        "qvl launch -s 2", "qvl launch -s 7 -f awq --port 8000",
        "qvl launch --model-path ./Qwen2-VL-2B-Instruct --model-uid vl",
        "qvl launch -s auto --host 0.0.0.0 --api-key KEY --foreground"))(launch)
    app.command("list", epilog=examples("qvl list", "qvl list --json"))(list_models)
    app.command(epilog=examples("qvl terminate qwen2-vl-instruct-2b-pytorch", "qvl terminate --all"))(terminate)
