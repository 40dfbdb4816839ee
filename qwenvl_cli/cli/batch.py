"""`qvl batch`: every conversation of a JSONL file, batched and resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qwenvl_cli.cli.options import (
    ApiKey,
    Attn,
    CaptionPrompt,
    Cluster,
    Device,
    DownloadHub,
    Dtype,
    Endpoint,
    EnforceEager,
    Force,
    Fps,
    GpuIdx,
    GpuMemoryUtilization,
    MaxFrames,
    MaxMemory,
    MaxModelLen,
    MaxPixels,
    MaxTokens,
    MinPixels,
    ModelEngine,
    ModelFormat,
    ModelName,
    ModelPath,
    ModelUid,
    NGpu,
    Offline,
    PipelineParallel,
    Quantization,
    RayAddress,
    RepetitionPenalty,
    Revision,
    Seed,
    SizeInBillions,
    Stop,
    Temperature,
    TopK,
    TopP,
    VideoEnd,
    VideoStart,
    engine_options,
    examples,
)


def batch(
    input_file: Annotated[Path, typer.Argument(metavar="INPUT.jsonl", help="One request per line: "
                                               '{"id": ..., "messages": [...]} (see docs/batch.md); or a folder of '
                                               "images / a Parquet file, with --prompt.", show_default=False)],
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
    pipeline_parallel: PipelineParallel = None, gpu_memory_utilization: GpuMemoryUtilization = None,
    max_model_len: MaxModelLen = None, enforce_eager: EnforceEager = False, ray_address: RayAddress = None,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first request that fails.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress or status on stderr.")] = False,
    cluster: Cluster = None, prompt: CaptionPrompt = None,
) -> None:
    """Answer every conversation of a JSONL file: batched, with progress, resumable."""
    if cluster:
        from qwenvl_cli.fit.packages import require_ray

        require_ray()  # before anything else
    from qwenvl_cli.batch.run import BatchCommand, run
    from qwenvl_cli.catalogue.resolve import SpecQuery
    from qwenvl_cli.generation import GenerationParams

    command = BatchCommand(
        input=input_file, output=output,
        query=SpecQuery(model_name, model_engine, size_in_billions, model_format, quantization, download_hub),
        model_path=model_path, revision=revision, offline=offline, force=force, endpoint=endpoint,
        model_uid=model_uid, api_key=api_key, batch_size=batch_size,
        media_flags=dict(min_pixels=min_pixels, max_pixels=max_pixels, fps=fps, max_frames=max_frames,
                         video_start=video_start, video_end=video_end),
        params=GenerationParams(max_tokens, temperature, top_p, top_k, repetition_penalty, seed, tuple(stop or ())),
        engine_options=engine_options(device, gpu_idx, n_gpu, max_memory, dtype, attn, model_engine=model_engine,
                                      model_format=model_format, pipeline_parallel=pipeline_parallel,
                                      gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                      enforce_eager=enforce_eager, ray_address=ray_address),
        fail_fast=fail_fast, quiet=quiet, cluster=cluster, prompt=prompt)
    raise typer.Exit(run(command))


def register(app: typer.Typer) -> None:
    app.command(epilog=examples(
        "qvl batch requests.jsonl -o answers.jsonl --max-tokens 128",
        "qvl batch requests.jsonl -o answers.jsonl -s 7 -f awq --batch-size 16 --max-pixels 401408",
        "qvl batch requests.jsonl -o answers.jsonl --endpoint http://127.0.0.1:8000/v1 --batch-size 16",
        "qvl batch requests.jsonl -o answers.jsonl -s 7 --cluster 10.0.0.5:6379",
        'qvl batch photos/ -o captions.jsonl --prompt "Describe this picture." --max-tokens 64',
        'input lines: {"id": "a1", "messages": [{"role": "user", "content": [{"type": "image_url", '
        '"image_url": {"url": "cat.jpg"}}, {"type": "text", "text": "Caption it."}]}], "max_tokens": 64}'))(batch)
