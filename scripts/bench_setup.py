"""What scripts/bench_generate.py measures on: a Qwen2-VL with the published dimensions and
random weights (built on the device, no download), a locally made tokenizer, one test image
of an exact number of visual tokens, and the machine's description and bandwidth figures.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

from benchutil import cpu_name  # scripts/ is on sys.path for every bench script

HERE = Path(__file__).resolve().parent

# The published Qwen2-VL-{2B,7B}-Instruct config.json values (see shared/reference/qwen2-vl.md).
PUBLISHED = {
    "2": {"text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                   "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True, "max_window_layers": 28},
          "params": 2_208_985_600},
    "7": {"text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False, "max_window_layers": 28},
          "params": 8_291_375_616},
}
VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "patch_size": 14,
          "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2}

# Peak memory bandwidth (TB/s) by GPU name, most specific first.
BANDWIDTH_TBS = (
    ("H200", 4.8, "H200 (HBM3e)"),
    ("H100 NVL", 3.9, "H100 NVL"),
    ("H100 PCIe", 2.0, "H100 PCIe"),
    ("H100", 3.35, "H100 SXM (HBM3)"),
    ("H800", 3.35, "H800 SXM"),
    ("A100-SXM4-80GB", 2.039, "A100 80GB SXM"),
    ("A100 80GB PCIe", 1.935, "A100 80GB PCIe"),
    ("A100", 1.555, "A100 40GB"),
    ("L40S", 0.864, "L40S"),
    ("RTX 4090", 1.008, "RTX 4090"),
    ("A10", 0.6, "A10"),
)


def _tiny_module():
    spec = importlib.util.spec_from_file_location("make_tiny_model", HERE / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def published_config(size: str, ids: dict[str, int]) -> dict:
    """config.json of Qwen2-VL-{size}B-Instruct with the local tokenizer's special-token ids."""
    mk = _tiny_module()
    config = mk.model_config(ids)
    text = PUBLISHED[size]["text"]
    config.update(text)
    config["vision_config"] = dict(VISION, hidden_size=text["hidden_size"])
    config["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 24]}
    return config


def write_checkpoint_files(size: str | None, out: Path) -> Path:
    """Tokenizer, configs, processor and chat template (no weights) in ``out``.

    ``size`` None writes the whole tiny checkpoint (weights included) instead."""
    mk = _tiny_module()
    out.mkdir(parents=True, exist_ok=True)
    if size is None:
        return mk.make_tiny_model(out)
    ids = mk.write_tokenizer(out)
    mk._write_json(out / "config.json", published_config(size, ids))
    mk._write_json(out / "generation_config.json", mk.generation_config(ids))
    mk._write_json(out / "preprocessor_config.json", mk.PREPROCESSOR_CONFIG)
    mk._write_json(out / "chat_template.json", {"chat_template": mk.CHAT_TEMPLATE})
    return out


def build_model(folder: Path, device: str, dtype, random_weights: bool = True):
    """The model of ``folder``'s config: random weights built directly on ``device``, or
    (no ``random_weights``) loaded from the folder's safetensors."""
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if not random_weights:
        model = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device)
        return model.eval()
    config = Qwen2VLConfig.from_pretrained(folder)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def count_meta_params(size: str) -> int:
    """Parameters of the published architecture, counted on the meta device (no memory)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    mk = _tiny_module()
    ids = {t: mk.LEARNED_VOCAB + i for i, t in enumerate(mk.SPECIAL_TOKENS)}
    config = Qwen2VLConfig.from_dict(json.loads(json.dumps(published_config(size, ids))))
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def make_image(path: Path, tokens: int) -> tuple[Path, int, int]:
    """A JPEG whose size is an exact multiple of 28 px with ``tokens`` visual tokens (about
    5:4), so that neither qwen-vl-utils nor the processor resizes it."""
    from PIL import Image, ImageDraw

    best = min(((w, tokens // w) for w in range(1, tokens + 1) if tokens % w == 0),
               key=lambda wh: abs(math.log(wh[0] / wh[1] / 1.25)))
    width, height = best[0] * 28, best[1] * 28
    image = Image.effect_noise((width, height), 50).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(0, width, 56):
        draw.rectangle([i, height // 4, i + 28, height // 2], fill=(i % 256, 80, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return path, width, height


def decode_bytes(model) -> dict[str, int]:
    """Bytes read per decoded token: decoder layers + final norm + lm_head (the embedding is
    read one row at a time; a tied lm_head is counted once), and the KV bytes per token."""
    lm = model.model.language_model
    layers = sum(p.numel() * p.element_size() for p in lm.layers.parameters())
    norm = sum(p.numel() * p.element_size() for p in lm.norm.parameters())
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * model.lm_head.weight.element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"decoder": layers + norm, "lm_head": head, "per_token": layers + norm + head, "kv_per_token": kv,
            "weights": weights}


def bandwidth(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--bandwidth-tbs"
    for key, tbs, label in BANDWIDTH_TBS:
        if key.lower() in name.lower():
            return tbs, f"datasheet, {label}"
    return None, "unknown GPU: pass --bandwidth-tbs"


def machine() -> dict[str, str]:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu_name(), "cores": str(os.cpu_count())}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=str(torch.version.cuda), driver=_driver(),
                    flash_attn="yes" if importlib.util.find_spec("flash_attn") else "no")
    return info


def _driver() -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return "unknown"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
