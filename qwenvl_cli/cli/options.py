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
    "--model-engine", "-en", metavar="ENGINE", help="Inference engine: transformers (default) or vllm "
    "(needs vLLM installed: pip install \"qvl[vllm]\"; see docs/engines.md).",
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
# Qwen2-VL's context length (max_position_embeddings), the same for every spec of the catalogue
# (tests/test_options.py checks it against the catalogue): a longer one cannot be served.
MAX_CONTEXT_LENGTH = 32768
ContextLength = Annotated[Optional[int], typer.Option(
    "--context-length", min=1, max=MAX_CONTEXT_LENGTH, help="Tokens of KV cache to plan memory for, at most "
    f"the model's context length (the default: {MAX_CONTEXT_LENGTH:,}).", rich_help_panel=MEMORY_PANEL,
    show_default=False)]
MaxPixels = Annotated[Optional[int], typer.Option(
    "--max-pixels", metavar="N", help="Upper bound on the pixels of each image and video frame "
    "after resizing (default for images: 1003520 = 1280*28*28, about 1,280 visual tokens; video frames: "
    "602112 = 768*28*28, lowered further for long clips).", rich_help_panel="Images and videos",
    show_default=False)]
Force = Annotated[bool, typer.Option(
    "--force", help="Go ahead even when the memory estimate says the model will not fit.",
    rich_help_panel=MEMORY_PANEL)]
Fit = Annotated[bool, typer.Option(
    "--fit", help="Add the estimated memory of each spec and whether it fits the visible GPUs.")]

# --- model location -------------------------------------------------------------------

MODEL_PANEL = "Model location"

ModelPath = Annotated[Optional[str], typer.Option(
    "--model-path", metavar="DIR", help="Use this local checkpoint folder; download nothing.",
    rich_help_panel=MODEL_PANEL, show_default=False)]
Revision = Annotated[Optional[str], typer.Option(
    "--revision", metavar="REV", help="Hub revision (branch, tag or commit) instead of the catalogue's.",
    rich_help_panel=MODEL_PANEL, show_default=False)]
Offline = Annotated[bool, typer.Option(
    "--offline", help="Use the local cache only (like HF_HUB_OFFLINE=1).", rich_help_panel=MODEL_PANEL)]

# --- engine -----------------------------------------------------------------------------

ENGINE_PANEL = "Engine"

Device = Annotated[str, typer.Option(
    "--device", metavar="DEVICE", help="auto (CUDA when available), cuda or cpu.", rich_help_panel=ENGINE_PANEL)]
NGpu = Annotated[Optional[int], typer.Option(
    "--n-gpu", metavar="N", help="Spread the model over the first N GPUs (transformers: accelerate "
    "device_map; vllm: tensor parallel N). --gpu-idx 0,1 also sets the count.",
    rich_help_panel=ENGINE_PANEL, show_default=False)]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", metavar="MEM", help="Memory per GPU for the weights: 20GiB, or 0=20GiB,1=30GiB.",
    rich_help_panel=ENGINE_PANEL, show_default=False)]
Dtype = Annotated[str, typer.Option(
    "--dtype", metavar="DTYPE", help="auto (bfloat16 on GPUs that support it, else float16; float32 on CPU), "
    "bfloat16, float16 or float32.", rich_help_panel=ENGINE_PANEL)]
Attn = Annotated[str, typer.Option(
    "--attn", metavar="IMPL", help="auto (flash_attention_2 when installed, else sdpa), sdpa, "
    "flash_attention_2 or eager.", rich_help_panel=ENGINE_PANEL)]

Compile = Annotated[str, typer.Option(
    "--compile", metavar="MODE", help="Decode step: auto (on one GPU: CUDA graphs for chat, torch.compile "
    "with a warm-up before a server says ready; off on CPU and for AWQ/GPTQ), on (torch.compile), graphs "
    "(CUDA graphs, no compiler) or off.", rich_help_panel=ENGINE_PANEL)]
StaticCache = Annotated[str, typer.Option(
    "--static-cache", metavar="auto|on|off", help="Preallocated KV cache in power-of-two buckets (auto: "
    "with --compile).", rich_help_panel=ENGINE_PANEL)]
DecodeLoop = Annotated[str, typer.Option(
    "--decode-loop", metavar="LOOP", help="auto or qvl (qvl's loop everywhere: on CUDA it samples on the GPU "
    "with no host sync per token; on a CPU it runs on the calling thread), or generate (transformers' "
    "generate, unchanged).", rich_help_panel=ENGINE_PANEL)]
GpuPreprocess = Annotated[str, typer.Option(
    "--gpu-preprocess", metavar="auto|on|off", help="Normalise and patch images and video frames on the "
    "GPU (auto: on CUDA).", rich_help_panel=ENGINE_PANEL)]

VLLM_PANEL = "vLLM engine (--model-engine vllm)"

PipelineParallel = Annotated[Optional[int], typer.Option(
    "--pipeline-parallel", metavar="P", min=1, help="Pipeline stages (vLLM pipeline_parallel_size; default 1); "
    "uses N x P GPUs with --n-gpu N.", rich_help_panel=VLLM_PANEL, show_default=False)]
GpuMemoryUtilization = Annotated[Optional[float], typer.Option(
    "--gpu-memory-utilization", metavar="F", help="Share of each GPU vLLM takes for weights, activations and "
    "KV cache (default 0.9).", rich_help_panel=VLLM_PANEL, show_default=False)]
MaxModelLen = Annotated[Optional[int], typer.Option(
    "--max-model-len", metavar="N", min=1, help="Longest sequence (prompt + answer) vLLM plans its KV cache "
    "for (default: the spec's context length, 32768; the checkpoint's with --model-path).",
    rich_help_panel=VLLM_PANEL, show_default=False)]
EnforceEager = Annotated[bool, typer.Option(
    "--enforce-eager", help="Run vLLM without CUDA graphs (default: graphs on GPUs; always eager on CPU).",
    rich_help_panel=VLLM_PANEL)]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray-address", metavar="ADDR", help="Run vLLM's Ray executor on this existing Ray cluster (e.g. "
    "head-node:6379) to span several machines (default: one machine, no Ray).",
    rich_help_panel=VLLM_PANEL, show_default=False)]

# --- media -------------------------------------------------------------------------------

MEDIA_PANEL = "Images and videos"

Images = Annotated[Optional[list[str]], typer.Option(
    "--image", "-i", metavar="IMAGE", help="An image: path, file:// or http(s) URL, or data URI. Repeatable.",
    rich_help_panel=MEDIA_PANEL, show_default=False)]
Videos = Annotated[Optional[list[str]], typer.Option(
    "--video", metavar="VIDEO", help="A video file (mp4, webm, mkv, mov, avi) or a folder of frame images. "
    "Repeatable.", rich_help_panel=MEDIA_PANEL, show_default=False)]
MinPixels = Annotated[Optional[int], typer.Option(
    "--min-pixels", metavar="N", help="Lower bound on the pixels of each image and video frame "
    "after resizing (default: 3136 for images, 100352 for video frames).", rich_help_panel=MEDIA_PANEL, show_default=False)]
Fps = Annotated[Optional[float], typer.Option(
    "--fps", metavar="FPS", help="Frames per second sampled from a video (default 2).",
    rich_help_panel=MEDIA_PANEL, show_default=False)]
MaxFrames = Annotated[Optional[int], typer.Option(
    "--max-frames", metavar="N", help="At most this many frames per video (default 768).",
    rich_help_panel=MEDIA_PANEL, show_default=False)]
VideoStart = Annotated[Optional[float], typer.Option(
    "--video-start", metavar="SEC", help="Start of the video clip to use, in seconds.",
    rich_help_panel=MEDIA_PANEL, show_default=False)]
VideoEnd = Annotated[Optional[float], typer.Option(
    "--video-end", metavar="SEC", help="End of the video clip to use, in seconds.",
    rich_help_panel=MEDIA_PANEL, show_default=False)]

# --- generation ----------------------------------------------------------------------------

GEN_PANEL = "Generation (unset: the checkpoint's generation_config)"

MaxTokens = Annotated[Optional[int], typer.Option(
    "--max-tokens", metavar="N", help="Most tokens to generate (default 2048, and never past the context length).",
    rich_help_panel=GEN_PANEL, show_default=False)]
Temperature = Annotated[Optional[float], typer.Option(
    "--temperature", metavar="T", help="Sampling temperature; 0 is greedy.", rich_help_panel=GEN_PANEL,
    show_default=False)]
TopP = Annotated[Optional[float], typer.Option(
    "--top-p", metavar="P", help="Nucleus sampling probability mass.", rich_help_panel=GEN_PANEL, show_default=False)]
TopK = Annotated[Optional[int], typer.Option(
    "--top-k", metavar="K", help="Sample from the K most likely tokens; 0 turns it off.", rich_help_panel=GEN_PANEL,
    show_default=False)]
RepetitionPenalty = Annotated[Optional[float], typer.Option(
    "--repetition-penalty", metavar="R", help="Penalty above 1 discourages repeats.", rich_help_panel=GEN_PANEL,
    show_default=False)]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", metavar="N", help="Random seed for sampling.", rich_help_panel=GEN_PANEL, show_default=False)]
Stop = Annotated[Optional[list[str]], typer.Option(
    "--stop", metavar="TEXT", help="Stop before this text. Repeatable.", rich_help_panel=GEN_PANEL,
    show_default=False)]

# --- downloads and the cache ----------------------------------------------------------

HUB_PANEL = "Download"

Quiet = Annotated[bool, typer.Option(
    "--quiet", help="No progress display or status lines (errors still go to stderr).",
    rich_help_panel=HUB_PANEL)]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would be done; change nothing.")]

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
AllowLocalMedia = Annotated[Optional[str], typer.Option(
    "--allow-local-media", metavar="DIR", help="Let requests name local files (paths, file:// URLs), only "
    "inside DIR. Default: requests can never read the server's files.", rich_help_panel=SERVER_PANEL,
    show_default=False)]
AllowRemoteMedia = Annotated[bool, typer.Option(
    "--allow-remote-media", help="Let the server fetch http(s) image and video URLs (bounded in size and "
    "time). Default: only inline data: URIs.", rich_help_panel=SERVER_PANEL)]
AllowMediaDomains = Annotated[Optional[list[str]], typer.Option(
    "--allow-media-domains", metavar="HOST", help="With --allow-remote-media: a host whose URLs may "
    "resolve to loopback, private or link-local addresses (repeat for more). Default: such addresses "
    "are refused after DNS resolution and on every redirect.", rich_help_panel=SERVER_PANEL,
    show_default=False)]
ShutdownGrace = Annotated[float, typer.Option(
    "--shutdown-grace", min=0, max=600, help="Seconds a shutdown waits for answers in progress to finish; "
    "then queued requests get 503 and streams in flight end with an error event.",
    rich_help_panel=SERVER_PANEL)]
MaxQueue = Annotated[int, typer.Option(
    "--max-queue", min=1, help="Requests admitted at once (running + waiting); more are answered 429.",
    rich_help_panel=SERVER_PANEL)]
MaxBatch = Annotated[int, typer.Option(
    "--max-batch", min=1, help="Decode up to this many requests together (continuous batching on a GPU, "
    "left-padded batches on CPU; they must share temperature, top_p, top_k, seed). 1: one at a time.",
    rich_help_panel=SERVER_PANEL)]
MaxBodyMb = Annotated[int, typer.Option(
    "--max-body-mb", min=1, help="Largest request body in MiB (inline images and videos count); larger "
    "ones are answered 413.", rich_help_panel=SERVER_PANEL)]

AllowedOrigins = Annotated[Optional[list[str]], typer.Option(
    "--allowed-origins", help="Web origins allowed to call the API from a browser (CORS), e.g. "
    "http://localhost:3000; repeat or separate with commas; '*' for any. Default: none.",
    rich_help_panel=SERVER_PANEL)]


# --- a Ray cluster (launch, batch; docs/cluster.md) ----------------------------------------

CLUSTER_PANEL = "Ray cluster"

Cluster = Annotated[Optional[str], typer.Option(
    "--cluster", metavar="HOST:PORT", help="Run on this Ray cluster: the head's address, as `ray start --head` "
    "printed it. Needs qvl[ray] here and on every node (docs/cluster.md).", rich_help_panel=CLUSTER_PANEL,
    show_default=False)]
Replicas = Annotated[int, typer.Option(
    "--replicas", min=1, help="With --cluster: engine replicas behind the one endpoint (each takes the GPUs "
    "the spec needs on one node; Ray replaces one that dies).", rich_help_panel=CLUSTER_PANEL)]
Autoscale = Annotated[Optional[str], typer.Option(
    "--autoscale", metavar="MIN:MAX", help="With --cluster: let Ray Serve keep between MIN and MAX replicas "
    "by load (instead of --replicas).", rich_help_panel=CLUSTER_PANEL, show_default=False)]
CacheDir = Annotated[Optional[str], typer.Option(
    "--cache-dir", metavar="DIR", help="With --cluster: each replica downloads into DIR (a path shared by the "
    "nodes: one download for all) instead of its node's hub cache.", rich_help_panel=CLUSTER_PANEL,
    show_default=False)]

CaptionPrompt = Annotated[Optional[str], typer.Option(
    "--prompt", metavar="TEXT", help="With a folder of images or a Parquet file (an 'image' column) as the "
    "input: what to ask of each image (a captioning job).", show_default=False)]


def examples(*lines: str) -> str:
    """The epilog of a command's --help: one example per line."""
    return "[bold]Examples[/bold]\n\n" + "\n".join(f"  {line}" for line in lines)


def engine_options(device: str, gpu_idx: str | None, n_gpu: int | None, max_memory: str | None, dtype: str,
                   attn: str, decode_loop: str = "auto", compile_mode: str = "auto", static_cache: str = "auto",
                   gpu_preprocess: str = "auto", warmup: bool = False, model_engine: str | None = None,
                   model_format: str | None = None, **vllm_flags):
    """The engine flags -> EngineOptions through the one builder (engine.options.build), which
    checks every value before anything is downloaded (with --model-engine vllm: that vLLM is
    installed and serves these flags). ``vllm_flags``: pipeline_parallel, gpu_memory_utilization,
    max_model_len, enforce_eager, ray_address."""
    from qwenvl_cli.engine.options import build

    return build(device, gpu_idx, n_gpu, max_memory, dtype, attn, decode_loop, compile_mode, static_cache,
                 gpu_preprocess, warmup, engine=model_engine, model_format=model_format, **vllm_flags)
