"""Command-line options declared once and reused by every command that takes them.

Spec flags use Xinference's names so that `qvl launch -s 7 -f awq` reads like
`xinference launch --size-in-billions 7 --model-format awq`.
"""

from __future__ import annotations

from pathlib import Path
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

# --- downloads and the cache ----------------------------------------------------------

HUB_PANEL = "Download"

Revision = Annotated[Optional[str], typer.Option(
    "--revision", help="Branch, tag or commit of the repo (default: the catalogue's: a pinned commit "
    "on Hugging Face, master on ModelScope).", rich_help_panel=HUB_PANEL, show_default=False)]
Offline = Annotated[bool, typer.Option(
    "--offline", help="Use the local cache only, never the network (same as HF_HUB_OFFLINE=1).",
    rich_help_panel=HUB_PANEL)]
Quiet = Annotated[bool, typer.Option(
    "--quiet", help="No progress display or status lines (errors still go to stderr).",
    rich_help_panel=HUB_PANEL)]
ModelPath = Annotated[Optional[Path], typer.Option(
    "--model-path", help="Use this local model folder as it is; download nothing.",
    rich_help_panel=HUB_PANEL, show_default=False)]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would be done; change nothing.")]
