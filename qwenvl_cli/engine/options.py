"""Engine options: the record the engine loads a model with, and the one builder that turns
the engine flags of `chat`, `batch` and `launch` into it.

Light on purpose (no torch): the builder runs before anything is downloaded, so that
``qvl chat --dtype fp17`` and ``qvl batch --device tpu`` stop at once, as ``qvl launch`` does.
What needs torch (which GPUs exist, bf16 support) is decided at load by engine.devices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from qwenvl_cli.errors import UsageError
from qwenvl_cli.fit.gpus import parse_gpu_idx

DEVICES = ("auto", "cuda", "cpu")
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
ATTNS = ("auto", "sdpa", "flash_attention_2", "eager")
COMPILE_MODES = ("auto", "on", "graphs", "off")
SWITCHES = ("auto", "on", "off")
DECODE_LOOPS = ("auto", "qvl", "generate")
ENGINES = ("transformers", "vllm")
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|mib|mb)?\s*$", re.I)


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"  # auto | cuda | cpu
    gpu_idx: tuple[int, ...] | None = None
    n_gpu: int | None = None
    max_memory: str | None = None  # "20GiB" for every GPU, or "0=20GiB,1=30GiB"
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    attn: str = "auto"  # auto | sdpa | flash_attention_2 | eager
    model_format: str = "pytorch"
    # The fast path (engine.fastpath): "auto" is decided by fastpath.resolve.
    decode_loop: str = "auto"  # auto | qvl | generate
    compile: str = "auto"  # auto | on (torch.compile) | graphs (CUDA graphs) | off
    static_cache: str = "auto"  # auto | on | off
    gpu_preprocess: str = "auto"  # auto | on | off: image normalisation on the GPU
    warmup: bool = False  # compile / capture the decode step at load (servers)
    # Which engine loads the model, and vLLM's own settings (engine.vllm; unused by transformers).
    engine: str = "transformers"  # transformers | vllm
    pipeline_parallel: int | None = None  # vLLM pipeline_parallel_size (default 1)
    gpu_memory_utilization: float | None = None  # vLLM's share of each GPU (default 0.9)
    max_model_len: int | None = None  # vLLM's longest sequence (default: the spec's context length)
    enforce_eager: bool = False  # vLLM without CUDA graphs
    ray_address: str | None = None  # vLLM's Ray executor on this cluster

    @property
    def parallel(self) -> int:
        """GPUs one copy of the model spans: tensor parallel (--n-gpu / --gpu-idx) times
        pipeline parallel. transformers spreads layers over the same count (device_map)."""
        tensor = len(self.gpu_idx) if self.gpu_idx else (self.n_gpu or 1)
        return tensor * (self.pipeline_parallel or 1)


def choice(flag: str, value: str | None, allowed: Iterable[str]) -> str:
    value = (value or "auto").lower()
    if value not in allowed:
        raise UsageError(f"unknown {flag} {value!r}", "use " + ", ".join(allowed))
    return value


def build(device: str = "auto", gpu_idx: str | None = None, n_gpu: int | None = None,
          max_memory: str | None = None, dtype: str = "auto", attn: str = "auto",
          decode_loop: str = "auto", compile: str = "auto", static_cache: str = "auto",
          gpu_preprocess: str = "auto", warmup: bool = False, engine: str | None = None,
          model_format: str | None = None, **vllm_flags) -> EngineOptions:
    """The engine flags -> EngineOptions, every value checked now (UsageError, exit 2).

    ``engine`` is --model-engine (None: transformers, the catalogue's first engine);
    ``vllm_flags`` are vLLM's (pipeline_parallel, gpu_memory_utilization, max_model_len,
    enforce_eager, ray_address), refused with the transformers engine. With vLLM, whether it is
    installed and whether it serves these flags and --model-format is checked here too."""
    device = choice("--device", device, DEVICES)
    dtype = (dtype or "auto").lower()
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}", "use auto, bfloat16, float16 or float32")
    if n_gpu is not None and n_gpu < 1:
        raise UsageError(f"--n-gpu {n_gpu} must be at least 1", "give the number of GPUs to use, e.g. --n-gpu 2")
    if max_memory:
        parse_max_memory(max_memory, tuple(range(64)))  # the syntax; GPU numbers are checked at load
    options = EngineOptions(device=device, gpu_idx=parse_gpu_idx(gpu_idx), n_gpu=n_gpu, max_memory=max_memory,
                            dtype=dtype, attn=choice("--attn", attn, ATTNS),
                            decode_loop=choice("--decode-loop", decode_loop, DECODE_LOOPS),
                            compile=choice("--compile", compile, COMPILE_MODES),
                            static_cache=choice("--static-cache", static_cache, SWITCHES),
                            gpu_preprocess=choice("--gpu-preprocess", gpu_preprocess, SWITCHES), warmup=warmup,
                            engine=choice("--model-engine", engine or "transformers", ENGINES),
                            **{k: v for k, v in vllm_flags.items() if v not in (None, False)})
    if options.engine == "vllm":
        from qwenvl_cli.engine.vllm_check import check_options

        check_options(options, model_format)
    else:
        given = sorted(f"--{k.replace('_', '-')}" for k, v in vllm_flags.items() if v not in (None, False))
        if given:
            raise UsageError(f"{', '.join(given)} {'is a' if len(given) == 1 else 'are'} vLLM flag"
                             f"{'' if len(given) == 1 else 's'}; the transformers engine has no such setting",
                             "add --model-engine vllm, or leave the flag out")
    return options


def parse_max_memory(value: str | None, gpus: tuple[int, ...]) -> dict[int, str] | None:
    """'20GiB' (every GPU) or '0=20GiB,1=30GiB' -> {0: '20GiB', 1: '30GiB'}."""
    if not value:
        return None
    out: dict[int, str] = {}
    for item in value.split(","):
        key, _, amount = item.rpartition("=")
        match = _MEMORY_RE.match(amount)
        if not match:
            raise UsageError(f"--max-memory {value!r}: {amount!r} is not an amount like 20GiB",
                             "write --max-memory 20GiB or --max-memory 0=20GiB,1=30GiB")
        size = f"{match.group(1)}{(match.group(2) or 'GiB').upper().replace('IB', 'iB')}"
        targets = gpus if not key else (int(key),) if key.strip().isdigit() else None
        if targets is None or any(t not in gpus for t in targets):
            raise UsageError(f"--max-memory {value!r} names GPU {key!r}, which is not in use",
                             f"GPUs in use: {', '.join(map(str, gpus)) or 'none'}")
        out.update({t: size for t in targets})
    return out

