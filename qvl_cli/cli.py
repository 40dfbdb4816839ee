"""The `qvl` command line: parse flags, call one function, render the result.

Commands stay thin; the work lives in the modules they call. Heavy modules (torch,
transformers, the hub SDKs, the HTTP server) are imported inside the commands that need
them, never at the top of this file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__, render, settings
from .errors import EXIT_FAILURE, QvlError, UsageError, translate
from .options import (AllowLocalMedia, AllowRemoteMedia, ApiKey, Attn, Compile, ContextLength, DecodeLoop, Device,
                      DownloadHub, DryRun, Dtype, Endpoint, Fit, Force, Foreground, Fps, GpuIdx, GpuPreprocess, Host,
                      Images, JsonOutput, MaxBatch, MaxBodyMb, MaxFrames, MaxMemory, MaxPixels, MaxQueue, MaxTokens,
                      MinPixels, ModelEngine, ModelFormat, ModelName, ModelPath, ModelUid, NGpu, Offline, Port,
                      Quantization, Quiet, RepetitionPenalty, Revision, Seed, SizeInBillions, StaticCache, Stop,
                      Temperature, TopK, TopP, VideoEnd, Videos, VideoStart, Yes)

APP_HELP = """qvl: launch, chat with and serve the Qwen2-VL vision-language models.

[bold]Examples[/bold]

  qvl chat --image photo.jpg "What is in this picture?"
  qvl chat -s 7 -f awq                   an interactive chat (/help lists its commands)
  qvl list-specs                         every model spec in the catalogue
  qvl resolve -s 7 -f awq                which checkpoint `launch -s 7 -f awq` would use
  qvl resolve -s auto                    the largest spec that fits the GPUs, and its memory
  qvl download -s 7 -f awq               fetch it into the Hugging Face (or ModelScope) cache
  qvl cached                             what is in the caches
  qvl launch -s 2                        serve it (OpenAI API) in the background
  qvl list                               the launched models; qvl terminate UID stops one
"""



def examples(*lines: str) -> str:
    """The epilog of a command's --help: one example per line."""
    return "[bold]Examples[/bold]\n\n" + "\n".join(f"  {line}" for line in lines)


app = typer.Typer(
    name="qvl", help=APP_HELP, rich_markup_mode="rich", no_args_is_help=True,
    add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qvl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """qvl: launch, chat with and serve the Qwen2-VL vision-language models."""


@app.command("list-specs", epilog=examples("qvl list-specs -s 7", "qvl list-specs -f gptq --json"))
def list_specs(
    model_name: ModelName = None,
    model_format: ModelFormat = None,
    size_in_billions: SizeInBillions = None,
    quantization: Quantization = None,
    show_fit: Fit = False,
    gpu_idx: GpuIdx = None,
    context_length: ContextLength = None,
    json_output: JsonOutput = False,
) -> None:
    """List the model specs of the catalogue, one row per spec and quantization.

    The "cached" column looks at local files only: a hub's short name means that hub's cache
    holds the catalogue's revision complete and verified."""
    from . import cache, specs

    catalogue = specs.load_catalogue()
    rows = specs.filter_rows(catalogue, model_name, model_format, size_in_billions, quantization)
    for row in rows:
        row["cached"] = cache.row_states(row)
    if show_fit:
        from . import fit, gpus, memory

        report = gpus.query(gpu_idx)
        rows = fit.annotate_rows(catalogue, rows, report, memory.workload(context_length))
        render.status("GPUs: " + report.describe())
    if json_output:
        render.print_json(rows)
        return
    extra = ["memory", "fits"] if show_fit else []
    render.table(
        ["name", "format", "size", "quantization", "engines", "huggingface", "modelscope", "cached", *extra],
        [[r["model_name"], r["model_format"], r["size_in_billions"] + "B", r["quantization"],
          ", ".join(r["engines"]), (r["huggingface"] or {}).get("model_id", "-"),
          (r["modelscope"] or {}).get("model_id", "-"), _cached_cell(r["cached"]),
          *render.fit_cells(r, show_fit)] for r in rows],
    )


_HUB_SHORT = {"huggingface": "hf", "modelscope": "ms"}


def _cached_cell(states: dict[str, str]) -> str:
    parts = [_HUB_SHORT[h] + ("" if st == "complete" else f" {st}")
             for h, st in states.items() if st != "absent"]
    return ", ".join(parts) or "-"


@app.command(epilog=examples("qvl resolve -s 7 -f awq", "qvl resolve -s 72 -f gptq -q Int8 --json"))
def resolve(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None,
    quantization: Quantization = None,
    download_hub: DownloadHub = None,
    gpu_idx: GpuIdx = None,
    context_length: ContextLength = None,
    max_pixels: MaxPixels = None,
    json_output: JsonOutput = False,
) -> None:
    """Show the concrete spec that `launch` would use, its memory estimate and whether it fits."""
    from . import fit, memory

    result = fit.resolve_and_check(model_name, model_engine, size_in_billions, model_format,
                                   quantization, download_hub, gpu_idx,
                                   memory.workload(context_length, max_pixels))
    spec = result.spec
    if result.choice is not None:
        render.status(result.choice.reason)
    if json_output:
        render.print_json({**spec.to_dict(), **result.to_dict()})
        return
    data = spec.to_dict()
    fields = ["model_name", "model_engine", "model_format", "size_in_billions",
              "quantization", "hub", "model_id", "revision", "context_length"]
    render.key_values(
        [(f, f"{data[f]}" + (" (default)" if f in spec.defaulted else "")) for f in fields]
        + [(f"{s.hub} id", f"{s.model_id} @ {s.revision}") for s in spec.sources[1:]]
        + result.rows(),
        title=spec.label(),
    )


@app.command(epilog=examples("qvl download -s 7 -f awq", "HF_ENDPOINT=https://hf-mirror.com qvl download -s 2",
                             "qvl download -s 2 --download-hub modelscope --quiet"))
def download(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None,
    quantization: Quantization = None,
    download_hub: DownloadHub = None,
    revision: Revision = None,
    offline: Offline = False,
    gpu_idx: GpuIdx = None,
    context_length: ContextLength = None,
    force: Force = False,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
) -> None:
    """Download a model spec into the hub's cache: only the files it needs, resumable, verified.

    Refuses a spec that will not fit the visible GPUs (unless --force) before fetching
    anything. Prints the model folder on stdout; progress and status go to stderr."""
    from . import hub, memory
    from .backends import check_spec

    flags = dict(model_name=model_name, model_engine=model_engine, size_in_billions=size_in_billions,
                 model_format=model_format, quantization=quantization, hub=download_hub)
    spec = check_spec(flags, gpu_idx=gpu_idx, force=force, workload=memory.workload(context_length, None),
                      need_backend=False, quiet=quiet, announce=True).spec
    model = hub.ensure_local(spec, revision=revision, offline=True if offline else None, quiet=quiet)
    if json_output:
        render.print_json(model.to_dict())
    else:
        typer.echo(str(model.path))


@app.command(epilog=examples("qvl verify -s 2", "qvl verify -s 7 -f awq --json"))
def verify(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None,
    quantization: Quantization = None,
    download_hub: DownloadHub = None,
    json_output: JsonOutput = False,
) -> None:
    """Re-hash a cached model against what was verified at download; report bad or missing files.

    A copy that fails loses its "complete" mark, so the next `qvl download` fetches the bad files again."""
    from . import cache, specs
    from .errors import ChecksumMismatch, NotCached

    spec = specs.resolve(model_name, model_engine, size_in_billions, model_format, quantization, download_hub)
    entries = [e for e in cache.for_spec(spec) if e.snapshot_name]
    if not entries:
        raise NotCached(f"{spec.label()} is not in the cache", "download it with `qvl download` and the same flags")
    reports = [cache.verify(e) for e in entries]
    if json_output:
        render.print_json([r.to_dict() for r in reports])
    else:
        render.table(["hub", "repo", "revision", "checked against", "files", "result"],
                     [[_HUB_SHORT[r.entry.hub], r.entry.repo_id, r.entry.revision[:40], r.against,
                       str(len(r.results)), "ok" if r.ok else f"{len(r.bad)} bad"] for r in reports])
        for r in reports:
            for name, problem in r.bad:
                typer.echo(f"{r.entry.repo_id}: {name}: {problem}")
    bad = [r for r in reports if not r.ok]
    if bad:
        first = bad[0].bad[0]
        raise ChecksumMismatch(f"{sum(len(r.bad) for r in bad)} file(s) do not match, e.g. {first[0]}: {first[1]}",
                               "run `qvl download` with the same flags to fetch them again")


@app.command(epilog=examples("qvl cached", "qvl cached --json"))
def cached(json_output: JsonOutput = False) -> None:
    """List the Qwen2-VL models in the Hugging Face and ModelScope caches."""
    from . import cache

    entries = cache.scan()
    if json_output:
        render.print_json([e.to_dict() for e in entries])
        return
    if not entries:
        render.note(f"no cached models in {settings.hf_hub_cache()} or {settings.modelscope_cache()}")
        return
    render.table(["spec", "hub", "repo", "revision", "state", "size", "path"], [_cached_row(e) for e in entries])


def _cached_row(e) -> list[str]:
    from .progress import human_bytes

    spec = e.spec
    quant = "" if spec["quantization"] == "none" else " " + spec["quantization"]
    label = f"{spec['size_in_billions']}B {spec['model_format']}{quant}"
    revision = e.revision if len(e.revision) < 40 else e.revision[:12]
    return [label, _HUB_SHORT[e.hub], e.repo_id, revision, e.state, human_bytes(e.size_on_disk), str(e.path)]


@app.command("remove-cache", epilog=examples("qvl remove-cache -s 7 -f awq", "qvl remove-cache --all-partial --yes",
                                             "qvl remove-cache -s 2 --dry-run"))
def remove_cache(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None,
    quantization: Quantization = None,
    download_hub: DownloadHub = None,
    revision: Revision = None,
    all_partial: Annotated[bool, typer.Option("--all-partial", help="Every partial download.")] = False,
    dry_run: DryRun = False,
    yes: Yes = False,
    json_output: JsonOutput = False,
) -> None:
    """Delete cached models: shows what goes and the space freed, asks, then deletes.

    Every cached revision of the spec goes unless --revision names one. Files that another
    cached revision still uses are kept."""
    from . import cache

    flags = (model_name, model_engine, size_in_billions, model_format, quantization, download_hub)
    plan = cache.plan_for(flags, all_partial, revision)
    if json_output:
        render.print_json(plan.to_dict())
    else:
        _show_plan(plan)
    if dry_run or not plan.items:
        return
    if not yes and not _confirm(f"delete {len(plan.items)} cached cop{'y' if len(plan.items) == 1 else 'ies'}?"):
        render.note("nothing deleted")
        raise typer.Exit(1)
    from .progress import human_bytes

    render.note(f"freed {human_bytes(cache.execute(plan))}")


def _show_plan(plan) -> None:
    from .progress import human_bytes

    if not plan.items:
        render.note("nothing to remove")
        return
    render.table(["hub", "repo", "revision", "state", "frees", "path"],
                 [[_HUB_SHORT[i.entry.hub], i.entry.repo_id, i.entry.revision[:40], i.entry.state,
                   human_bytes(i.freed), str(i.entry.path)] for i in plan.items],
                 title=f"to delete: {human_bytes(plan.freed)}")
    for item in plan.items:
        if item.kept:
            render.note(f"kept (used by another cached revision of {item.entry.repo_id}): {', '.join(item.kept)}")


def _confirm(question: str) -> bool:
    try:
        return typer.confirm(question, default=False, err=True)
    except typer.Abort:  # end of input
        return False


# --- launched models: launch, list, terminate ---------------------------------------------


@app.command(epilog=examples(
    "qvl launch -s 2", "qvl launch -s 7 -f awq --port 8000",
    "qvl launch --model-path ./Qwen2-VL-2B-Instruct --model-uid vl",
    "qvl launch -s auto --host 0.0.0.0 --api-key KEY --foreground"))
def launch(
    model_name: ModelName = None,
    model_engine: ModelEngine = None,
    size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None,
    quantization: Quantization = None,
    download_hub: DownloadHub = None,
    model_path: ModelPath = None,
    revision: Revision = None,
    offline: Offline = False,
    device: Device = "auto",
    gpu_idx: GpuIdx = None,
    n_gpu: NGpu = None,
    max_memory: MaxMemory = None,
    dtype: Dtype = "auto",
    attn: Attn = "auto",
    compile_mode: Compile = "auto",
    static_cache: StaticCache = "auto",
    decode_loop: DecodeLoop = "auto",
    gpu_preprocess: GpuPreprocess = "auto",
    context_length: ContextLength = None,
    max_pixels: MaxPixels = None,
    force: Force = False,
    model_uid: ModelUid = None,
    host: Host = "127.0.0.1",
    port: Port = None,
    api_key: ApiKey = None,
    foreground: Foreground = False,
    allow_local_media: AllowLocalMedia = None,
    allow_remote_media: AllowRemoteMedia = False,
    max_queue: MaxQueue = 32,
    max_batch: MaxBatch = 8,
    max_body_mb: MaxBodyMb = 64,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
) -> None:
    """Start a model as an OpenAI-compatible server in the background and print its endpoint."""
    from dataclasses import asdict, replace

    from . import devices, fastpath, launcher, memory

    key = launcher.default_api_key(api_key)
    launcher.warn_exposed(host, key)
    engine = replace(devices.engine_options(device, gpu_idx, n_gpu, max_memory, dtype, attn), warmup=True,
                     **fastpath.flags(decode_loop, compile_mode, static_cache, gpu_preprocess))
    launcher.check_port_free(host, port)
    choice = launcher.choose_model(
        dict(model_name=model_name, model_engine=model_engine, size_in_billions=size_in_billions,
             model_format=model_format, quantization=quantization, hub=download_hub),
        model_path, memory.workload(context_length, max_pixels), gpu_idx, force, model_uid, revision,
        offline, quiet, device)
    config = launcher.server_config(
        choice, asdict(engine), host, port, context_length=context_length, max_pixels=max_pixels,
        allow_local_media=allow_local_media, allow_remote_media=allow_remote_media, max_queue=max_queue,
        max_batch=max_batch, max_body_bytes=max_body_mb * 2**20, foreground=foreground)
    show = (lambda entry: render.print_json(entry.to_dict())) if json_output else _show_launched
    if foreground:
        raise typer.Exit(launcher.run_foreground(config, key, on_ready=show))
    show(launcher.start(config, key, quiet))


def _show_launched(entry) -> None:
    from . import launcher

    render.key_values(launcher.summary(entry), title=f"{entry.uid} is running")
    typer.echo("\n" + launcher.examples(entry))


@app.command("list", epilog=examples("qvl list", "qvl list --json"))
def list_models(json_output: JsonOutput = False) -> None:
    """List the models started with `qvl launch` that are running."""
    from . import launcher, registry

    entries = registry.entries()
    if json_output:
        render.print_json([e.to_dict() for e in entries])
    elif not entries:
        render.status("no launched model is running; start one with `qvl launch -s 2`")
    else:
        render.table(["uid", "spec", "endpoint", "pid", "uptime", "state", "GPU memory"],
                     launcher.rows(entries))


@app.command(epilog=examples("qvl terminate qwen2-vl-instruct-2b-pytorch", "qvl terminate --all"))
def terminate(
    model_uid: Annotated[Optional[str], typer.Argument(metavar="UID", help="The model to stop.",
                                                       show_default=False)] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Stop every launched model.")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0, help="Seconds to wait for a clean stop before killing it.")] = 10.0,
) -> None:
    """Stop a launched model (SIGTERM, then SIGKILL after --timeout) and forget it."""
    from . import launcher, registry

    if all_models == (model_uid is not None):
        raise UsageError("give either a model UID or --all", "see the running models with `qvl list`")
    targets = registry.entries() if all_models else [registry.find(model_uid)]
    if not targets:
        render.status("no launched model is running")
    for entry in targets:
        outcome = launcher.terminate(entry, timeout)
        render.status(f"{entry.uid}: {outcome} (pid {entry.pid})")


@app.command(epilog=examples(
    'qvl chat --image photo.jpg "What is in this picture?"',
    'qvl chat -s 7 -f awq --video clip.mp4 --fps 1 "Summarise the clip"',
    "qvl chat --model-path ./my-checkpoint          (interactive; /help inside)",
    'echo "Describe it" | qvl chat --image x.png --json -',
    'qvl chat --model-uid qwen2-vl-instruct-2b-pytorch "Hello"     (a model started with qvl launch)'))
def chat(
    prompt: Annotated[Optional[str], typer.Argument(
        metavar="PROMPT", help="The question; - reads it from stdin. Without it: an interactive chat.", show_default=False)] = None,
    model_name: ModelName = None, model_engine: ModelEngine = None, size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None, quantization: Quantization = None, download_hub: DownloadHub = None,
    model_path: ModelPath = None, revision: Revision = None, offline: Offline = False,
    image: Images = None, video: Videos = None, min_pixels: MinPixels = None, max_pixels: MaxPixels = None,
    fps: Fps = None, max_frames: MaxFrames = None, video_start: VideoStart = None, video_end: VideoEnd = None,
    system: Annotated[Optional[str], typer.Option("--system", metavar="TEXT", help="System prompt.",
                                                  show_default=False)] = None,
    max_tokens: MaxTokens = None, temperature: Temperature = None, top_p: TopP = None, top_k: TopK = None,
    repetition_penalty: RepetitionPenalty = None, seed: Seed = None, stop: Stop = None,
    device: Device = "auto", gpu_idx: GpuIdx = None, n_gpu: NGpu = None, max_memory: MaxMemory = None,
    dtype: Dtype = "auto", attn: Attn = "auto", compile_mode: Compile = "auto", static_cache: StaticCache = "auto",
    decode_loop: DecodeLoop = "auto", gpu_preprocess: GpuPreprocess = "auto", force: Force = False,
    endpoint: Endpoint = None, model_uid: ModelUid = None, api_key: ApiKey = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, usage, timings).")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print token counts and speed on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Print each image's and video's size, frames "
                                          "and visual tokens on stderr.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress or status on stderr.")] = False,
) -> None:
    """Ask about images and videos: one answer streamed to stdout, or an interactive chat."""
    from . import chat_run, devices, fastpath
    from .engine import EngineOptions
    from .generation import GenerationParams

    fast = fastpath.flags(decode_loop=decode_loop, compile=compile_mode, static_cache=static_cache,
                          gpu_preprocess=gpu_preprocess)
    request = chat_run.ChatRequest(
        prompt=prompt, spec_flags=dict(model_name=model_name, model_engine=model_engine,
                                       size_in_billions=size_in_billions, model_format=model_format,
                                       quantization=quantization, hub=download_hub),
        model_path=model_path, revision=revision, offline=offline, force=force,
        images=tuple(image or ()), videos=tuple(video or ()),
        media_flags=dict(min_pixels=min_pixels, max_pixels=max_pixels, fps=fps, max_frames=max_frames,
                         video_start=video_start, video_end=video_end),
        system=system, params=GenerationParams(max_tokens, temperature, top_p, top_k, repetition_penalty,
                                               seed, tuple(stop or ())),
        engine_options=EngineOptions(device, devices.parse_gpu_idx(gpu_idx), n_gpu, max_memory, dtype, attn,
                                     **fast),
        json_output=json_output, stats=stats, verbose=verbose, quiet=quiet,
        endpoint=endpoint, model_uid=model_uid, api_key=api_key)
    raise typer.Exit(chat_run.run(request))


@app.command(epilog=examples(
    "qvl batch requests.jsonl -o answers.jsonl --max-tokens 128",
    "qvl batch requests.jsonl -o answers.jsonl -s 7 -f awq --batch-size 16 --max-pixels 401408",
    "qvl batch requests.jsonl -o answers.jsonl --endpoint http://127.0.0.1:8000/v1 --batch-size 16",
    'input lines: {"id": "a1", "messages": [{"role": "user", "content": [{"type": "image_url", '
    '"image_url": {"url": "cat.jpg"}}, {"type": "text", "text": "Caption it."}]}], "max_tokens": 64}'))
def batch(
    input_file: Annotated[Path, typer.Argument(metavar="INPUT.jsonl", help="One request per line: "
                                               '{"id": ..., "messages": [...]} (see docs/batch.md).', show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUTPUT.jsonl", help="Answers, one JSON line per "
                                         "request, appended as they finish; rerunning skips ids answered here.",
                                         show_default=False)],
    model_name: ModelName = None, model_engine: ModelEngine = None, size_in_billions: SizeInBillions = None,
    model_format: ModelFormat = None, quantization: Quantization = None, download_hub: DownloadHub = None,
    model_path: ModelPath = None, revision: Revision = None, offline: Offline = False,
    endpoint: Endpoint = None, model_uid: ModelUid = None, api_key: ApiKey = None,
    batch_size: Annotated[str, typer.Option(
        "--batch-size", metavar="N|auto", help="Requests decoded together (with --endpoint: sent at once). auto: "
        "from the memory estimate and the free GPU memory; 4 on CPU; 8 in flight with --endpoint.")] = "auto",
    min_pixels: MinPixels = None, max_pixels: MaxPixels = None, fps: Fps = None, max_frames: MaxFrames = None,
    video_start: VideoStart = None, video_end: VideoEnd = None,
    max_tokens: MaxTokens = None, temperature: Temperature = None, top_p: TopP = None, top_k: TopK = None,
    repetition_penalty: RepetitionPenalty = None, seed: Seed = None, stop: Stop = None,
    device: Device = "auto", gpu_idx: GpuIdx = None, n_gpu: NGpu = None, max_memory: MaxMemory = None,
    dtype: Dtype = "auto", attn: Attn = "auto", force: Force = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first request that fails.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress or status on stderr.")] = False,
) -> None:
    """Answer every conversation of a JSONL file: batched, with progress, resumable."""
    from . import batch as batch_mod
    from . import devices
    from .engine import EngineOptions
    from .generation import GenerationParams

    request = batch_mod.BatchRequest(
        input=input_file, output=output,
        spec_flags=dict(model_name=model_name, model_engine=model_engine, size_in_billions=size_in_billions,
                        model_format=model_format, quantization=quantization, hub=download_hub),
        model_path=model_path, revision=revision, offline=offline, force=force, endpoint=endpoint,
        model_uid=model_uid, api_key=api_key, batch_size=batch_size,
        media_flags=dict(min_pixels=min_pixels, max_pixels=max_pixels, fps=fps, max_frames=max_frames,
                         video_start=video_start, video_end=video_end),
        params=GenerationParams(max_tokens, temperature, top_p, top_k, repetition_penalty, seed, tuple(stop or ())),
        engine_options=EngineOptions(device, devices.parse_gpu_idx(gpu_idx), n_gpu, max_memory, dtype, attn),
        fail_fast=fail_fast, quiet=quiet)
    raise typer.Exit(batch_mod.run(request))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every expected failure into one line + a hint."""
    try:
        app(args=argv, prog_name="qvl")
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place errors are rendered
        if isinstance(exc, KeyboardInterrupt):
            render.stderr_console().print("[dim]interrupted[/dim]")
            sys.exit(130)
        error = translate(exc)
        if settings.debug():
            raise
        if error is None:
            error = QvlError(f"unexpected error: {type(exc).__name__}: {exc}",
                             "rerun with QVL_DEBUG=1 to see the traceback, and report it")
        render.error(error.message, error.hint)
        sys.exit(getattr(error, "exit_code", EXIT_FAILURE))
