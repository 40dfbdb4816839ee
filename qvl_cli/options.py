"""Command-line options declared once and reused by every command that takes them.

Spec flags use Xinference's names so that `qvl launch -s 7 -f awq` reads like
`xinference launch --size-in-billions 7 --model-format awq`.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

SPEC_PANEL = "Model spec"

ModelName = Annotated[Optional[str], typer.Option(
    "--model-name", "-n", help="Model family (default: qwen2-vl-instruct).",
    rich_help_panel=SPEC_PANEL, show_default=False)]
ModelEngine = Annotated[Optional[str], typer.Option(
    "--model-engine", "-en", help="Inference engine (default: transformers).",
    rich_help_panel=SPEC_PANEL, show_default=False)]
SizeInBillions = Annotated[Optional[str], typer.Option(
    "--size-in-billions", "-s", help="Model size in billions: 2, 7, 72 (1.5 or 1_5 for fractions). "
    "Default: the smallest size of the format.", rich_help_panel=SPEC_PANEL, show_default=False)]
ModelFormat = Annotated[Optional[str], typer.Option(
    "--model-format", "-f", help="pytorch, gptq or awq (default: pytorch).",
    rich_help_panel=SPEC_PANEL, show_default=False)]
Quantization = Annotated[Optional[str], typer.Option(
    "--quantization", "-q", help="Int4, Int8 or none; needed only where a spec has several.",
    rich_help_panel=SPEC_PANEL, show_default=False)]
DownloadHub = Annotated[Optional[str], typer.Option(
    "--download-hub", help="huggingface, modelscope or auto (default: $QVL_DOWNLOAD_HUB, else auto: "
    "Hugging Face, falling back to ModelScope when it cannot be reached).",
    rich_help_panel=SPEC_PANEL, show_default=False)]

JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of a table.")]

MEDIA_PANEL = "Images and video"

Images = Annotated[Optional[list[str]], typer.Option(
    "--image", help="An image: path, file:// or http(s):// URL, or data:image/...;base64 URI. "
    "Repeatable.", rich_help_panel=MEDIA_PANEL, show_default=False)]
Videos = Annotated[Optional[list[str]], typer.Option(
    "--video", help="A video file (mp4, webm, mkv, mov, avi) or a directory of frame images. "
    "Repeatable.", rich_help_panel=MEDIA_PANEL, show_default=False)]
MinPixels = Annotated[Optional[int], typer.Option(
    "--min-pixels", help="Lower bound on the pixels of each image and video frame after resizing "
    "(default: 3136 for images, 100352 for video frames).", rich_help_panel=MEDIA_PANEL,
    show_default=False, min=784)]
MaxPixels = Annotated[Optional[int], typer.Option(
    "--max-pixels", help="Upper bound on the pixels of each image and video frame after resizing "
    "(default for images: 1003520 = 1280*28*28, about 1,280 visual tokens; video frames: "
    "602112 = 768*28*28, lowered further for long clips).", rich_help_panel=MEDIA_PANEL,
    show_default=False, min=784)]
Fps = Annotated[Optional[float], typer.Option(
    "--fps", help="Frames sampled per second of video (default 2).", rich_help_panel=MEDIA_PANEL,
    show_default=False)]
MaxFrames = Annotated[Optional[int], typer.Option(
    "--max-frames", help="Most frames sampled from a video (default 768).", rich_help_panel=MEDIA_PANEL,
    show_default=False)]
VideoStart = Annotated[Optional[float], typer.Option(
    "--video-start", help="Seconds into each video where sampling starts.", rich_help_panel=MEDIA_PANEL,
    show_default=False)]
VideoEnd = Annotated[Optional[float], typer.Option(
    "--video-end", help="Seconds into each video where sampling ends.", rich_help_panel=MEDIA_PANEL,
    show_default=False)]
