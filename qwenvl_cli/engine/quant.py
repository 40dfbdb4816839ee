"""How quantized checkpoints (AWQ Int4, GPTQ Int4/Int8) load (what they need installed is
fit.packages, checked before any download).

:func:`inspect` reads a checkpoint's ``config.json`` and returns its quantization config with
the module names normalised to the transformers 5.x layout: the published Qwen2-VL AWQ
configs exclude the vision tower as ``"visual"``, which transformers 5.x (whose tower is
``model.visual``) does not match, so it would wrap the 16-bit vision tower in AWQ layers.
Neither torch nor transformers is imported here; the engine applies the result.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenvl_cli.fit.packages import CPU_BACKENDS, FORMATS

# Published (transformers 4.x) top-level module names -> transformers 5.x module paths.
_VISION, _VISION_5 = "visual", "model.visual"
_TEXT, _TEXT_5 = "model.", "model.language_model."


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
