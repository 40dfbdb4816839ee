"""Where and how a model runs: device, GPUs, dtype, attention implementation.

``plan(torch, options)`` takes the torch module as an argument so that the rules can be
tested with a stand-in on a machine without GPUs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from qwenvl_cli.engine.options import ATTNS, DTYPES, parse_max_memory
from qwenvl_cli.errors import EngineError, MissingDependency, UsageError


@dataclass(frozen=True)
class Plan:
    device: str  # "cpu" or "cuda:N" (the first GPU when several)
    gpus: tuple[int, ...]
    dtype: Any
    dtype_name: str
    attn: str
    max_memory: dict[int, str] | None = None
    notes: tuple[str, ...] = ()

    @property
    def device_map(self) -> Any:
        if not self.gpus:
            return None
        if len(self.gpus) == 1:
            return {"": self.device}  # load straight onto the GPU
        return "auto"

    @property
    def load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if self.max_memory:
            kwargs["max_memory"] = self.max_memory
        return kwargs

    @property
    def input_device(self) -> str:
        return self.device

    def describe(self) -> str:
        if not self.gpus:
            return "cpu"
        return "cuda:" + ",".join(str(g) for g in self.gpus)


def _select_gpus(torch: Any, options: Any) -> tuple[int, ...]:
    count = torch.cuda.device_count()
    if options.gpu_idx:
        missing = [i for i in options.gpu_idx if i >= count]
        if missing:
            have = f"{count} GPU{'s' if count != 1 else ''} ({', '.join(map(str, range(count)))})" if count else "no GPU"
            raise UsageError(f"GPU index {missing[0]} does not exist: this machine has {have}",
                             "pick existing GPUs with --gpu-idx (see nvidia-smi; CUDA_VISIBLE_DEVICES renumbers them)")
        if options.n_gpu and options.n_gpu != len(options.gpu_idx):
            raise UsageError(f"--n-gpu {options.n_gpu} does not match --gpu-idx {','.join(map(str, options.gpu_idx))}",
                             "give one of the two")
        return tuple(options.gpu_idx)
    n = options.n_gpu or 1
    if n < 1 or n > count:
        raise UsageError(f"--n-gpu {n}: this machine has {count} GPU{'s' if count != 1 else ''}",
                         f"use --n-gpu between 1 and {count}")
    return tuple(range(n))


def _dtype(torch: Any, options: Any, on_gpu: bool) -> tuple[Any, str, list[str]]:
    notes: list[str] = []
    wanted = options.dtype.lower()
    if wanted != "auto" and wanted not in DTYPES:
        raise UsageError(f"unknown --dtype {options.dtype!r}", "use auto, bfloat16, float16 or float32")
    if wanted == "auto":
        if not on_gpu:
            name = "float32"
        else:
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        name = DTYPES[wanted]
    if options.model_format == "awq" and on_gpu and name != "float16":
        if wanted != "auto":
            notes.append(f"AWQ checkpoints run in float16 on CUDA; --dtype {options.dtype} is ignored")
        name = "float16"
    return getattr(torch, name), name, notes


def _attn(options: Any, on_gpu: bool, dtype_name: str) -> str:
    wanted = options.attn.lower()
    if wanted not in ATTNS:
        raise UsageError(f"unknown --attn {options.attn!r}", "use " + ", ".join(ATTNS))
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if wanted == "flash_attention_2":
        if not on_gpu:
            raise UsageError("flash_attention_2 needs a CUDA GPU", "use --attn sdpa on CPU")
        if not has_flash:
            raise MissingDependency("--attn flash_attention_2 needs the flash-attn package",
                                    "pip install flash-attn --no-build-isolation, or use --attn sdpa")
        if dtype_name == "float32":
            raise UsageError("flash_attention_2 needs float16 or bfloat16", "use --dtype bfloat16")
    if wanted == "auto":
        return "flash_attention_2" if on_gpu and has_flash and dtype_name != "float32" else "sdpa"
    return wanted


def plan(torch: Any, options: Any) -> Plan:
    """Decide device, GPUs, dtype and attention from the options and what torch sees."""
    device = options.device.lower()
    if device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"unknown --device {options.device!r}", "use auto, cuda or cpu")
    has_cuda = bool(torch.cuda.is_available())
    if device == "cuda" and not has_cuda:
        raise EngineError("--device cuda was asked for, but torch sees no CUDA GPU",
                          "use --device cpu, or check nvidia-smi, CUDA_VISIBLE_DEVICES and the torch build")
    if device == "cpu" and (options.gpu_idx or options.n_gpu):
        raise UsageError("--gpu-idx / --n-gpu cannot be used with --device cpu", "drop one of them")
    if device == "auto" and not has_cuda and (options.gpu_idx or options.n_gpu):
        raise UsageError("--gpu-idx / --n-gpu were given, but torch sees no CUDA GPU",
                         "check nvidia-smi and CUDA_VISIBLE_DEVICES, or run on --device cpu")
    on_gpu = device == "cuda" or (device == "auto" and has_cuda)
    gpus = _select_gpus(torch, options) if on_gpu else ()
    dtype, dtype_name, notes = _dtype(torch, options, on_gpu)
    attn = _attn(options, on_gpu, dtype_name)
    max_memory = parse_max_memory(options.max_memory, gpus) if on_gpu else None
    if options.max_memory and not on_gpu:
        raise UsageError("--max-memory applies to GPUs only", "drop --max-memory on CPU")
    if len(gpus) > 1 and max_memory is None:
        max_memory = {g: f"{_free_gib(torch, g)}GiB" for g in gpus}
    return Plan(f"cuda:{gpus[0]}" if gpus else "cpu", gpus, dtype, dtype_name, attn, max_memory, tuple(notes))


def _free_gib(torch: Any, index: int) -> int:
    """Memory accelerate may use on one GPU when the user gave no --max-memory (90% of free)."""
    free, _total = torch.cuda.mem_get_info(index)
    return max(1, int(free * 0.9 / 2**30))
