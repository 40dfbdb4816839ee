"""`qvl chat`: one answer, or an interactive chat, about images and videos."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from qwenvl_cli.cli.options import (
    ApiKey,
    Attn,
    Compile,
    DecodeLoop,
    Device,
    DownloadHub,
    Dtype,
    Endpoint,
    EnforceEager,
    Force,
    Fps,
    GpuIdx,
    GpuMemoryUtilization,
    GpuPreprocess,
    Images,
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
    StaticCache,
    Stop,
    Temperature,
    TopK,
    TopP,
    VideoEnd,
    Videos,
    VideoStart,
    engine_options,
    examples,
)


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
    pipeline_parallel: PipelineParallel = None, gpu_memory_utilization: GpuMemoryUtilization = None,
    max_model_len: MaxModelLen = None, enforce_eager: EnforceEager = False, ray_address: RayAddress = None,
    endpoint: Endpoint = None, model_uid: ModelUid = None, api_key: ApiKey = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, usage, timings).")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print token counts and speed on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Print each image's and video's size, frames "
                                          "and visual tokens on stderr.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress or status on stderr.")] = False,
) -> None:
    """Ask about images and videos: one answer streamed to stdout, or an interactive chat."""
    from qwenvl_cli.catalogue.resolve import SpecQuery
    from qwenvl_cli.chat.run import ChatCommand, run
    from qwenvl_cli.generation import GenerationParams

    command = ChatCommand(
        prompt=prompt,
        query=SpecQuery(model_name, model_engine, size_in_billions, model_format, quantization, download_hub),
        model_path=model_path, revision=revision, offline=offline, force=force,
        images=tuple(image or ()), videos=tuple(video or ()),
        media_flags=dict(min_pixels=min_pixels, max_pixels=max_pixels, fps=fps, max_frames=max_frames,
                         video_start=video_start, video_end=video_end),
        system=system, params=GenerationParams(max_tokens, temperature, top_p, top_k, repetition_penalty,
                                               seed, tuple(stop or ())),
        engine_options=engine_options(device, gpu_idx, n_gpu, max_memory, dtype, attn, decode_loop, compile_mode,
                                      static_cache, gpu_preprocess,
                                      model_engine=model_engine, model_format=model_format,
                                      pipeline_parallel=pipeline_parallel, gpu_memory_utilization=gpu_memory_utilization,
                                      max_model_len=max_model_len, enforce_eager=enforce_eager, ray_address=ray_address),
        json_output=json_output, stats=stats, verbose=verbose, quiet=quiet,
        endpoint=endpoint, model_uid=model_uid, api_key=api_key)
    raise typer.Exit(run(command))


def register(app: typer.Typer) -> None:
    app.command(epilog=examples(
        'qvl chat --image photo.jpg "What is in this picture?"',
        'qvl chat -s 7 -f awq --video clip.mp4 --fps 1 "Summarise the clip"',
        "qvl chat --model-path ./my-checkpoint          (interactive; /help inside)",
        'echo "Describe it" | qvl chat --image x.png --json -',
        'qvl chat --model-uid qwen2-vl-instruct-2b-pytorch "Hello"     (a model started with qvl launch)'))(chat)
