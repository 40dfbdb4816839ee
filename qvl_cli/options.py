"""Command-line options declared once and reused by every command that takes them.

Spec flags use Xinference's names so that `qvl launch -s 7 -f awq` reads like
`xinference launch --size-in-billions 7 --model-format awq`.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

SPEC_PANEL = "Model spec"

ModelName = Annotated[Optional[str], typer.Option(
    "--model-name", "-n", metavar="NAME", help="Model family (default: qwen2-vl-instruct).",
    rich_help_panel=SPEC_PANEL, show_default=False)]
ModelEngine = Annotated[Optional[str], typer.Option(
    "--model-engine", "-en", metavar="ENGINE", help="Inference engine (default: transformers).",
    rich_help_panel=SPEC_PANEL, show_default=False)]
SizeInBillions = Annotated[Optional[str], typer.Option(
    "--size-in-billions", "-s", metavar="SIZE", help="Model size in billions: 2, 7, 72 (1.5 or 1_5 for fractions). "
    "Default: the smallest size of the format.", rich_help_panel=SPEC_PANEL, show_default=False)]
ModelFormat = Annotated[Optional[str], typer.Option(
    "--model-format", "-f", metavar="FORMAT", help="pytorch, gptq or awq (default: pytorch).",
    rich_help_panel=SPEC_PANEL, show_default=False)]
Quantization = Annotated[Optional[str], typer.Option(
    "--quantization", "-q", metavar="QUANT", help="Int4, Int8 or none; needed only where a spec has several.",
    rich_help_panel=SPEC_PANEL, show_default=False)]
DownloadHub = Annotated[Optional[str], typer.Option(
    "--download-hub", metavar="HUB", help="huggingface, modelscope or auto (default: $QVL_DOWNLOAD_HUB, else auto: "
    "Hugging Face, falling back to ModelScope when it cannot be reached).",
    rich_help_panel=SPEC_PANEL, show_default=False)]

JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of a table.")]
