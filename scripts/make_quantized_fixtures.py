"""Turn the tiny random Qwen2-VL checkpoint into tiny AWQ and GPTQ checkpoints in the published format.

    python scripts/make_quantized_fixtures.py OUT_DIR [--tiny DIR] [--formats awq,gptq-int4,gptq-int8]

writes OUT_DIR/tiny-awq, OUT_DIR/tiny-gptq-int4 and OUT_DIR/tiny-gptq-int8. Each folder has the
files of the published Qwen/Qwen2-VL-*-Instruct-AWQ / -GPTQ-Int4 / -GPTQ-Int8 repositories: the
tensors keep the stored names of the published checkpoints (`model.layers.N...`, `visual...`),
the 7 linear layers of every decoder layer are replaced by packed integer weights, everything
else (vision tower, embeddings, norms, biases) stays 16-bit, and config.json carries the
`quantization_config` the published repositories carry:

- AWQ (written by AutoAWQ): bits 4, group_size, `modules_to_not_convert: ["visual"]`,
  quant_method awq, version gemm, zero_point true (asymmetric, zeros stored as they are);
  qweight [in, out/8] packed along the output dimension in AWQ's interleaved nibble order.
- GPTQ (written by AutoGPTQ): bits 4 or 8, group_size, damp_percent, desc_act false,
  static_groups false, sym true, true_sequential true, model_name_or_path null,
  model_file_base_name "model", quant_method gptq; no module list (the vision tower is
  outside the quantized block list); qweight [in*bits/32, out] packed along the input
  dimension, qzeros packed along the output dimension and stored minus one (the v1 format),
  g_idx = input index // group_size.

The integer weights come from round-to-nearest quantization of each group (symmetric for
GPTQ, asymmetric for AWQ). The real AWQ and GPTQ algorithms only choose better integers from
calibration data; the stored format, which is what loading and the kernels see, is the same.
Pure torch + safetensors: no quantization backend is needed to write the fixtures, so they
are generated (in well under a second, same bytes every time) rather than shipped.

Group size: 128 as published when every quantized layer's input width is a multiple of it;
otherwise the largest power of two that divides them all (the tiny model: inputs 64 and 128,
so 64). The script prints which.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PUBLISHED_GROUP_SIZE = 128
QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# AWQ's GEMM layout: nibble i of a packed int32 holds output column AWQ_ORDER[i] of its block of 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FORMATS = {"awq": ("awq", 4), "gptq-int4": ("gptq", 4), "gptq-int8": ("gptq", 8)}
COPIED = ("generation_config.json", "preprocessor_config.json", "chat_template.json",
          "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def awq_config(group_size: int) -> dict:
    return {"bits": 4, "group_size": group_size, "modules_to_not_convert": ["visual"],
            "quant_method": "awq", "version": "gemm", "zero_point": True}


def gptq_config(bits: int, group_size: int) -> dict:
    return {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": False,
            "static_groups": False, "sym": True, "true_sequential": True,
            "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq"}


def choose_group_size(in_widths: list[int]) -> int:
    """128 when it divides every input width, else the largest power of two that does."""
    if all(w % PUBLISHED_GROUP_SIZE == 0 for w in in_widths):
        return PUBLISHED_GROUP_SIZE
    common = math.gcd(*in_widths)
    return min(common & -common, PUBLISHED_GROUP_SIZE)


# --- quantization and packing -----------------------------------------------------------------

def _groups(weight, group_size: int):
    """[out, in] float32 -> [out, n_groups, group_size]."""
    out_f, in_f = weight.shape
    return weight.float().reshape(out_f, in_f // group_size, group_size)


def quantize_symmetric(weight, bits: int, group_size: int):
    """GPTQ's symmetric grid: zero = 2**(bits-1), scale = 2*max|w| / (2**bits - 1).
    Returns q [out, in] int, scales [n_groups, out], zeros [n_groups, out] int."""
    import torch

    maxq = 2 ** bits - 1
    g = _groups(weight, group_size)
    amax = g.abs().amax(dim=-1).clamp(min=1e-8)  # [out, n_groups]
    scale = (2 * amax / maxq).half().float()  # the stored (float16) scale is the one used
    zero = torch.full_like(scale, (maxq + 1) // 2)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, maxq)
    return q.reshape(weight.shape).int(), scale.t().contiguous(), zero.t().int().contiguous()


def quantize_asymmetric(weight, bits: int, group_size: int):
    """AWQ's asymmetric grid: scale = (max - min) / (2**bits - 1), zero = round(-min / scale)."""
    import torch

    maxq = 2 ** bits - 1
    g = _groups(weight, group_size)
    wmax, wmin = g.amax(dim=-1), g.amin(dim=-1)
    scale = ((wmax - wmin).clamp(min=1e-8) / maxq).half().float()
    zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, maxq)
    return q.reshape(weight.shape).int(), scale.t().contiguous(), zero.t().int().contiguous()


def pack_rows(values, bits: int):
    """Pack consecutive rows: [rows, cols] -> [rows*bits/32, cols] int32, row j of a block at bit j*bits."""
    import torch

    per = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0] // per, per, values.shape[1])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return _to_int32((v << shifts).sum(dim=1))


def pack_columns(values, bits: int, order: tuple[int, ...] | None = None):
    """Pack consecutive columns: [rows, cols] -> [rows, cols*bits/32] int32; slot i of a block holds
    column order[i] of that block (sequential when order is None)."""
    import torch

    per = 32 // bits
    order = order or tuple(range(per))
    v = values.to(torch.int64).reshape(values.shape[0], values.shape[1] // per, per)[..., list(order)]
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, 1, per)
    return _to_int32((v << shifts).sum(dim=-1))


def unpack_rows(packed, bits: int):
    """The inverse of pack_rows."""
    import torch

    per, mask = 32 // bits, 2 ** bits - 1
    v = packed.to(torch.int64) & 0xFFFFFFFF
    parts = torch.stack([(v >> (i * bits)) & mask for i in range(per)], dim=1)  # [rows/per, per, cols]
    return parts.reshape(-1, packed.shape[1]).int()


def unpack_columns(packed, bits: int, order: tuple[int, ...] | None = None):
    """The inverse of pack_columns."""
    import torch

    per, mask = 32 // bits, 2 ** bits - 1
    v = packed.to(torch.int64) & 0xFFFFFFFF
    slots = torch.stack([(v >> (i * bits)) & mask for i in range(per)], dim=-1)  # [rows, cols/per, per]
    cols = torch.empty_like(slots)
    cols[..., list(order or range(per))] = slots
    return cols.reshape(packed.shape[0], -1).int()


def _to_int32(packed):
    import torch

    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # same bits, signed
    return packed.to(torch.int32).contiguous()


def fake_quantize(weight, method: str, bits: int, group_size: int):
    """The float weight [out, in] that the packed tensors of ``weight`` stand for: what a correct
    kernel multiplies by (up to its own rounding)."""
    quantize = quantize_asymmetric if method == "awq" else quantize_symmetric
    q, scales, zeros = quantize(weight, bits, group_size)
    out_f, in_f = weight.shape
    g = (q - zeros.t().repeat_interleave(group_size, dim=1)).float()
    return g * scales.t().repeat_interleave(group_size, dim=1)


def gptq_tensors(weight, bits: int, group_size: int) -> dict:
    import torch

    q, scales, zeros = quantize_symmetric(weight, bits, group_size)
    in_f = weight.shape[1]
    return {"qweight": pack_rows(q.t().contiguous(), bits),  # [in*bits/32, out]
            "qzeros": pack_columns(zeros - 1, bits),  # v1 format stores zero - 1
            "scales": scales.half(),
            "g_idx": (torch.arange(in_f, dtype=torch.int32) // group_size)}


def awq_tensors(weight, group_size: int) -> dict:
    q, scales, zeros = quantize_asymmetric(weight, 4, group_size)
    return {"qweight": pack_columns(q.t().contiguous(), 4, AWQ_ORDER),  # [in, out/8]
            "qzeros": pack_columns(zeros, 4, AWQ_ORDER),
            "scales": scales.half()}


# --- checkpoints --------------------------------------------------------------------------------

def _is_quantized(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(".weight") and any(
        name.endswith(f".{m}.weight") for m in QUANTIZED)


def quantize_checkpoint(tensors: dict, method: str, bits: int, group_size: int) -> dict:
    import torch

    out = {}
    for name, tensor in sorted(tensors.items()):
        if _is_quantized(name):
            prefix = name[: -len(".weight")]
            packed = (awq_tensors(tensor, group_size) if method == "awq"
                      else gptq_tensors(tensor, bits, group_size))
            out.update({f"{prefix}.{k}": v for k, v in packed.items()})
        else:
            out[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    return {k: v.contiguous() for k, v in out.items()}


def write_fixture(tiny: Path, out: Path, fmt: str, group_size: int | None = None) -> Path:
    """Write one quantized checkpoint (fmt: awq, gptq-int4 or gptq-int8) from the tiny one."""
    from safetensors.torch import load_file, save_file

    method, bits = FORMATS[fmt]
    tensors = load_file(str(tiny / "model.safetensors"))
    widths = [t.shape[1] for n, t in tensors.items() if _is_quantized(n)]
    group_size = group_size or choose_group_size(widths)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((tiny / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = "float16"
    config["quantization_config"] = (awq_config(group_size) if method == "awq"
                                     else gptq_config(bits, group_size))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in COPIED:
        (out / name).write_bytes((tiny / name).read_bytes())
    save_file(quantize_checkpoint(tensors, method, bits, group_size), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    return out


def make_quantized_fixtures(tiny: Path, out_dir: Path, formats=tuple(FORMATS)) -> dict[str, Path]:
    """{fmt: folder} for each format, written under out_dir as tiny-awq, tiny-gptq-int4, ..."""
    return {fmt: write_fixture(Path(tiny), Path(out_dir) / f"tiny-{fmt}", fmt) for fmt in formats}


def _make_tiny_model(out_dir: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_tiny_model import make_tiny_model

    return make_tiny_model(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tiny", type=Path, help="the tiny checkpoint (default: make one in OUT_DIR/tiny)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: " + ", ".join(FORMATS))
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format {unknown[0]!r}; use {', '.join(FORMATS)}")
    tiny = args.tiny or _make_tiny_model(args.out_dir / "tiny")
    for fmt, folder in make_quantized_fixtures(tiny, args.out_dir, formats).items():
        q = json.loads((folder / "config.json").read_text())["quantization_config"]
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        note = "" if q["group_size"] == PUBLISHED_GROUP_SIZE else (
            f" (not the published 128: the tiny layers are {q['group_size']} or 2x wide)")
        print(f"wrote {folder} ({size / 1e3:.0f} KB): {q['quant_method']} {q['bits']}-bit, "
              f"group size {q['group_size']}{note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
