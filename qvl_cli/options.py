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
    "--model-name", "-n", metavar="NAME", help="Model family (default: qwen2-vl-instruct).",
    rich_help_panel=SPEC_PANEL, show_default=False)]
ModelEngine = Annotated[Optional[str], typer.Option(
    "--model-engine", "-en", metavar="ENGINE", help="Inference engine (default: transformers).",
    rich_help_panel=SPEC_PANEL, show_default=False)]
SizeInBillions = Annotated[Optional[str], typer.Option(
    "--size-in-billions", "-s", metavar="SIZE", help="Model size in billions: 2, 7, 72 (1.5 or 1_5 for fractions), "
    "or auto: the largest size, then the least quantized format, that fits the GPUs. "
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

MEMORY_PANEL = "Memory"

GpuIdx = Annotated[Optional[str], typer.Option(
    "--gpu-idx", help="GPUs to use, e.g. 0 or 0,1, numbered as CUDA sees them after "
    "CUDA_VISIBLE_DEVICES (default: all visible).", rich_help_panel=MEMORY_PANEL, show_default=False)]
ContextLength = Annotated[Optional[int], typer.Option(
    "--context-length", min=1, help="Tokens of KV cache to plan memory for (default: the model's "
    "context length, 32768).", rich_help_panel=MEMORY_PANEL, show_default=False)]
MaxPixels = Annotated[Optional[int], typer.Option(
    "--max-pixels", min=784, help="Pixel budget of one image: larger images are scaled down to it "
    "(default: 1280*28*28 = 1003520, i.e. 1,280 visual tokens).", rich_help_panel=MEMORY_PANEL,
    show_default=False)]
Force = Annotated[bool, typer.Option(
    "--force", help="Go ahead even when the memory estimate says the model will not fit.",
    rich_help_panel=MEMORY_PANEL)]
Fit = Annotated[bool, typer.Option(
    "--fit", help="Add the estimated memory of each spec and whether it fits the visible GPUs.")]

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

# --- engine (launch and chat) ---------------------------------------------------------

ENGINE_PANEL = "Engine"

Device = Annotated[str, typer.Option(
    "--device", metavar="DEVICE", help="auto, cuda or cpu (auto: the GPUs when torch sees any).",
    rich_help_panel=ENGINE_PANEL)]
NGpu = Annotated[Optional[int], typer.Option(
    "--n-gpu", min=1, help="Spread the model over this many GPUs (default: 1, or as many as --gpu-idx lists).",
    rich_help_panel=ENGINE_PANEL, show_default=False)]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", metavar="SIZE", help="Weights per GPU when spreading: 20GiB for every GPU, or 0=20GiB,1=30GiB.",
    rich_help_panel=ENGINE_PANEL, show_default=False)]
Dtype = Annotated[str, typer.Option(
    "--dtype", metavar="DTYPE", help="auto, bfloat16, float16 or float32 (auto: bfloat16 on GPUs that have it, "
    "float16 on older ones and for AWQ, float32 on CPU).", rich_help_panel=ENGINE_PANEL)]
Attn = Annotated[str, typer.Option(
    "--attn", metavar="IMPL", help="Attention: auto, sdpa, flash_attention_2 or eager (auto: "
    "flash_attention_2 when installed and on a GPU, else sdpa).", rich_help_panel=ENGINE_PANEL)]

# --- served models (launch, list, terminate, chat) -------------------------------------

SERVER_PANEL = "Server"

ModelUid = Annotated[Optional[str], typer.Option(
    "--model-uid", "-u", metavar="UID", help="Name of the launched model (default: the spec's, e.g. "
    "qwen2-vl-instruct-7b-awq-int4; the folder's name with --model-path).", rich_help_panel=SERVER_PANEL,
    show_default=False)]
ApiKey = Annotated[Optional[str], typer.Option(
    "--api-key", metavar="KEY", help="Key every request must send as 'Authorization: Bearer KEY' "
    "(default: $QVL_API_KEY; none: no key needed).", rich_help_panel=SERVER_PANEL, show_default=False)]
Endpoint = Annotated[Optional[str], typer.Option(
    "--endpoint", metavar="URL", help="Talk to this OpenAI-compatible server (e.g. http://host:8000/v1) "
    "instead of loading a model.", rich_help_panel=SERVER_PANEL, show_default=False)]
Host = Annotated[str, typer.Option(
    "--host", help="Address to listen on; 0.0.0.0 opens it to the network (then use --api-key).",
    rich_help_panel=SERVER_PANEL)]
Port = Annotated[Optional[int], typer.Option(
    "--port", min=1, max=65535, help="Port to listen on (default: a free one).", rich_help_panel=SERVER_PANEL,
    show_default=False)]
Foreground = Annotated[bool, typer.Option(
    "--foreground", help="Serve in this process until Ctrl-C / SIGTERM (for containers and service "
    "managers) instead of in the background.", rich_help_panel=SERVER_PANEL)]
AllowLocalMedia = Annotated[Optional[Path], typer.Option(
    "--allow-local-media", metavar="DIR", help="Let requests name local files (paths, file:// URLs), only "
    "inside DIR. Default: requests can never read the server's files.", rich_help_panel=SERVER_PANEL,
    show_default=False)]
AllowRemoteMedia = Annotated[bool, typer.Option(
    "--allow-remote-media", help="Let the server fetch http(s) image and video URLs (bounded in size and "
    "time). Default: only inline data: URIs.", rich_help_panel=SERVER_PANEL)]
MaxQueue = Annotated[int, typer.Option(
    "--max-queue", min=1, help="Requests admitted at once (running + waiting); more are answered 429.",
    rich_help_panel=SERVER_PANEL)]
MaxBodyMb = Annotated[int, typer.Option(
    "--max-body-mb", min=1, help="Largest request body in MiB (inline images and videos count); larger "
    "ones are answered 413.", rich_help_panel=SERVER_PANEL)]
