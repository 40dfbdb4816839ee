"""Quantized checkpoints (AWQ Int4, GPTQ Int4/Int8): what they need installed, and how they load.

transformers 5.x loads AWQ through ``gptqmodel`` and GPTQ through ``optimum`` + ``gptqmodel``.
:func:`require_backend` checks, before anything is downloaded or imported, that those packages
are there (``importlib.util.find_spec`` and package metadata only: nothing heavy is imported)
and, when the model is to run on CPU, that the installed ``gptqmodel`` has CPU kernels for the
format. It raises :class:`MissingDependency` naming the install command.

:func:`inspect` reads a checkpoint's ``config.json`` and returns its quantization config with
the module names normalised to the transformers 5.x layout: the published Qwen2-VL AWQ
configs exclude the vision tower as ``"visual"``, which transformers 5.x (whose tower is
``model.visual``) does not match, so it would wrap the 16-bit vision tower in AWQ layers.
Neither torch nor transformers is imported here; the engine applies the result.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EngineError, MissingDependency

FORMATS = ("awq", "gptq")
# The import names transformers needs for each format (the pip names are the same).
REQUIRED = {"awq": ("gptqmodel",), "gptq": ("optimum", "gptqmodel")}
# gptqmodel's pure-torch kernels, which run on CPU (looked up as files: no import).
CPU_KERNELS = {"awq": "nn_modules/qlinear/torch_awq.py", "gptq": "nn_modules/qlinear/torch.py"}
# ...and the names that select them. Left to choose on CPU, gptqmodel picks its AVX512-BF16
# kernel where the CPU has it, which first builds a C++ extension: 4 minutes on 2 cores.
CPU_BACKENDS = {"awq": "torch_awq", "gptq": "gptq_torch"}
TESTED = "gptqmodel 7.7, optimum 2.3"
# Published (transformers 4.x) top-level module names -> transformers 5.x module paths.
_VISION, _VISION_5 = "visual", "model.visual"
_TEXT, _TEXT_5 = "model.", "model.language_model."


def install_command(model_format: str) -> str:
    return f'pip install "qvl[{model_format.lower()}]"'


def is_quantized(model_format: str | None) -> bool:
    return bool(model_format) and model_format.lower() in FORMATS


@dataclass(frozen=True)
class Backend:
    """What is installed for one format, and whether it can run on CPU."""

    model_format: str
    versions: dict[str, str]
    cpu: bool  # the installed gptqmodel has CPU kernels for this format
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        packages = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        where = "CUDA GPUs and CPU" if self.cpu else "CUDA GPUs only"
        return f"{self.model_format.upper()} backend: {packages} (runs on {where})"


def require_backend(model_format: str, device: str = "auto") -> Backend | None:
    """Check that the packages for ``model_format`` are importable; None for unquantized formats.

    ``device`` is where the model will run: ``cuda``, ``cpu``, or ``auto`` (then the GPUs are
    probed without torch, see :mod:`qvl_cli.gpus`). On CPU the installed backend must have CPU
    kernels for the format; otherwise this stops with a one-line reason.
    """
    fmt = (model_format or "").lower()
    if fmt not in FORMATS:
        return None
    missing = [name for name in REQUIRED[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        names = " and ".join(missing)
        raise MissingDependency(
            f"{fmt.upper()} checkpoints need {names}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: {install_command(fmt)}",
            f'`pip install "qvl[quant]"` installs the backends of both AWQ and GPTQ (tested: {TESTED})')
    versions = {name: _version(name) for name in REQUIRED[fmt]}
    cpu = _has_cpu_kernel(fmt)
    on_cpu = _runs_on_cpu(device)
    notes: list[str] = []
    if on_cpu and not cpu:
        raise EngineError(
            f"the installed gptqmodel {versions['gptqmodel']} has no CPU kernel for {fmt.upper()}: "
            f"it runs on CUDA GPUs only",
            f'upgrade it (`pip install -U "qvl[{fmt}]"`: gptqmodel 7.7 runs AWQ and GPTQ on CPU), '
            "or run on a CUDA GPU (--device cuda)")
    if on_cpu:
        notes.append(f"{fmt.upper()} on CPU runs gptqmodel's torch kernels: it works, but is far "
                     "slower than on a GPU")
    return Backend(fmt, versions, cpu, tuple(notes))


def _runs_on_cpu(device: str) -> bool:
    device = (device or "auto").lower()
    if device in ("cpu", "cuda"):
        return device == "cpu"
    from . import gpus  # auto: ask the driver, not torch

    return not gpus.query().visible  # no driver to ask (unknown) means no usable GPU either


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _has_cpu_kernel(fmt: str) -> bool:
    spec = importlib.util.find_spec("gptqmodel")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return any((Path(root) / CPU_KERNELS[fmt]).is_file() for root in roots)


# --- the checkpoint's quantization config ---------------------------------------------------


@dataclass(frozen=True)
class Quantized:
    """A quantized checkpoint: its method, bits and the quantization config to load it with."""

    method: str  # awq | gptq
    bits: int | None
    config: dict[str, Any]  # normalised; pass it as config.quantization_config
    notes: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.method.upper()} Int{self.bits}" if self.bits else self.method.upper()

    def load_config(self, on_gpu: bool) -> dict[str, Any]:
        """The quantization config to load with: on CPU it selects gptqmodel's torch kernels."""
        return dict(self.config) if on_gpu else {**self.config, "backend": CPU_BACKENDS[self.method]}


def inspect(path: str | Path) -> Quantized | None:
    """The checkpoint's quantization (None when it is not AWQ or GPTQ), normalised for loading."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the engine reports a missing or broken config itself
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() not in FORMATS:
        return None
    fixed, notes = normalise(qc, stored_tensor_names(path))
    return Quantized(str(qc["quant_method"]).lower(), qc.get("bits"), fixed, tuple(notes))


def module_path(name: str) -> str:
    """A module name of the published checkpoints -> its transformers 5.x path.

    ``visual...`` -> ``model.visual...``; ``model.layers...`` (the language model) ->
    ``model.language_model.layers...``; names already in the new layout stay.
    """
    if name == _VISION or name.startswith(_VISION + "."):
        return "model." + name
    if name.startswith(_TEXT) and not name.startswith((_VISION_5, "model.language_model")):
        return _TEXT_5 + name[len(_TEXT):]
    return name


def normalise(qc: dict[str, Any], stored: set[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Return a copy of ``qc`` whose module names also match the transformers 5.x layout.

    - ``modules_to_not_convert`` (AWQ): each published name gets its 5.x path added, and the
      vision tower is excluded whenever the checkpoint stores it unquantized (no ``qweight``
      under ``visual``), as every published Qwen2-VL AWQ and GPTQ checkpoint does.
    - ``block_name_to_quantize`` (GPTQ, optimum): mapped to the 5.x path, since a name that
      matches no module makes optimum wrap nothing and load a random language model.
    """
    out = dict(qc)
    notes: list[str] = []
    method = str(qc.get("quant_method", "")).lower()
    skip = list(qc.get("modules_to_not_convert") or [])
    added = [module_path(n) for n in skip if module_path(n) not in skip]
    if method == "awq" and stored is not None and not _vision_quantized(stored):
        added += [n for n in (_VISION, _VISION_5) if n not in skip + added]
    if added:
        out["modules_to_not_convert"] = skip + list(dict.fromkeys(added))
        notes.append(f"kept 16-bit: {', '.join(dict.fromkeys(added))} (the checkpoint names the vision "
                     f"tower {skip or 'nowhere'}; transformers 5 calls it {_VISION_5})")
    block = qc.get("block_name_to_quantize")
    if block:
        mapped = [module_path(b) for b in block] if isinstance(block, list) else module_path(block)
        if mapped != block:
            out["block_name_to_quantize"] = mapped
            notes.append(f"quantized blocks {block} -> {mapped}")
    return out, notes


def _vision_quantized(stored: set[str]) -> bool:
    return any(n.startswith((_VISION + ".", _VISION_5 + ".")) and n.endswith(".qweight") for n in stored)


def stored_tensor_names(path: str | Path) -> set[str] | None:
    """The tensor names in a checkpoint's safetensors files (read from the index or the file
    headers, without loading tensors); None when there are none to read."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        names: set[str] = set()
        files = sorted(path.glob("*.safetensors"))
        for file in files:
            with open(file, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            names.update(k for k in header if k != "__metadata__")
        return names if files else None
    except (OSError, ValueError, KeyError, struct.error):
        return None


def drop_compiled_kernels(model: Any) -> int:
    """Undo gptqmodel's per-layer ``torch.compile`` of its torch kernels; returns how many.

    On CPU, gptqmodel's ``TorchLinear`` compiles its dequantize step per layer instance on the
    first call: seconds per layer with inductor's C++ backend (38 s for the 14 layers of the
    tiny test checkpoint), for no gain at the sizes a CPU can run. The compiled wrapper is an
    instance attribute; removing it restores the plain method.
    """
    count = 0
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if callable(value) and hasattr(value, "_torchdynamo_orig_callable"):
                delattr(module, name)
                count += 1
    return count
