"""Write a tiny random Qwen2-VL-Instruct checkpoint that loads and generates like the real one.

The folder has the same files as Qwen/Qwen2-VL-2B-Instruct (config, generation config, processor
config, chat template, byte-level BPE tokenizer with the Qwen2 special tokens, safetensors weights
with the checkpoint's own tensor names, optionally in shards with an index), only with tiny
dimensions and a tokenizer trained here on a small built-in corpus. Same seed, same bytes.

    python scripts/make_tiny_model.py OUT_DIR [--seed N] [--shards N] [--head-size 16|32|64]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# The Qwen2 special tokens, in the order (and so with the relative ids) of the real tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Trained BPE vocabulary size (256 byte symbols + merges); the special tokens come right after.
LEARNED_VOCAB = 896
# The embedding matrix is padded up to a multiple of this, as in the real config (151936).
VOCAB_PAD_MULTIPLE = 64
# Standard deviation of the random token embeddings (tied with the output head).
EMBED_STD = 0.02
# The <|im_end|> row is longer than the others, so that (as with a real model) some answers end
# on their own: with seed 0, "Hello there." ends after 7 tokens, "Tell me a story." runs on.
IM_END_SCALE = 1.5

PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "mrope_section": [2, 3, 3]}
VISION = {"depth": 2, "embed_dim": 32, "mlp_ratio": 4, "num_heads": 2, "in_chans": 3,
          "hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
          "temporal_patch_size": 2}

# The Qwen2-VL-Instruct chat template, written from its documented behaviour: a default system
# turn when the conversation does not start with one; string contents verbatim; list contents
# item by item (image / video placeholders, optionally numbered with add_vision_id, counted
# across the whole conversation; text items as is). transformers renders with trim_blocks, so
# no literal newline may follow a block tag.
CHAT_TEMPLATE = "".join((
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}",
    "{% for message in messages %}",
    "{% if loop.first and message['role'] != 'system' %}",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "<|im_start|>{{ message['role'] }}\n",
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n",
    "{% else %}{% for content in message['content'] %}",
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}",
    "{% set image_count.value = image_count.value + 1 %}",
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "{% elif content['type'] == 'video' or 'video' in content %}",
    "{% set video_count.value = video_count.value + 1 %}",
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}",
    "<|vision_start|><|video_pad|><|vision_end|>",
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}",
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
))

PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

# Training text for the tokenizer: chat-style English, a little code and numbers, and some
# Chinese, so that both scripts tokenize into more than single bytes and decode cleanly.
CORPUS = """\
system
user
assistant
You are a helpful assistant.
Describe this image. Describe this video. What is in the picture? What happens in the video?
The image shows a cat sitting on a wooden table next to a window. The sky is blue and clear.
A dog runs across the green grass in the park while children play with a red ball.
There are two people in the picture: a woman wearing a yellow coat and a man holding an umbrella.
The video begins with a car driving down a quiet street, then the camera turns to the river.
In the first frame the screen is red, in the second frame it is green, and then it becomes blue.
Please answer the question in one sentence. Explain your answer step by step.
Sure! Here is a short description of the scene. I can see a mountain, a lake and some trees.
The quick brown fox jumps over the lazy dog. The weather today is sunny with a light breeze.
Count the objects: one apple, two oranges, three bananas, four grapes and five lemons.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 28 100 256 1024 2024 3.14 42% $19.99
The model reads the picture as a grid of patches of 14 by 14 pixels and merges them two by two.
def hello(name):
    return f"Hello, {name}!"
print(hello("world"))
{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
Question: How many cars are parked on the street? Answer: There are three cars.
Thank you! You're welcome. I'm not sure, but it looks like a bird. It's a small white boat.
这是一张图片。图片里有一只猫坐在桌子上。
请描述这张图片。这个视频里发生了什么？
天空是蓝色的，草地是绿色的，孩子们在公园里玩。
你好，我是一个有用的助手。我可以回答关于图片和视频的问题。
一只小狗在河边跑步，远处有山和树。
今天天气很好，我们去看电影吧。
"""


def _ids() -> dict[str, int]:
    return {tok: LEARNED_VOCAB + i for i, tok in enumerate(SPECIAL_TOKENS)}


def _vocab_size() -> int:
    used = LEARNED_VOCAB + len(SPECIAL_TOKENS)
    return -(-used // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def train_tokenizer():
    """A byte-level BPE tokenizer shaped like Qwen2's, trained on CORPUS, with the specials."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=LEARNED_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    lines = CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(lines * 3, trainer=trainer)
    if tok.get_vocab_size() != LEARNED_VOCAB:
        raise RuntimeError(f"corpus too small: learned {tok.get_vocab_size()} of {LEARNED_VOCAB}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(out: Path) -> dict[str, int]:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json; returns the special ids."""
    tok = train_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    data = json.loads(tok.to_str())
    _write_json(out / "tokenizer.json", data)
    model = data["model"]
    _write_json(out / "vocab.json", model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in ids.items()}
    _write_json(out / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    return ids


def text_dims(head_size: int = 16) -> dict:
    """TEXT with the attention head size changed (hidden_size stays 64): vLLM's CPU attention
    rejects head size 16, accepts 32 and 64. mrope_section must sum to head_size / 2 and keeps
    the published 2:3:3 split (the real 2B model: head 128, [16, 24, 24])."""
    if head_size not in (16, 32, 64):
        raise ValueError("head size must be 16, 32 or 64")
    heads = TEXT["hidden_size"] // head_size
    unit = head_size // 16
    return {**TEXT, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
            "mrope_section": [2 * unit, 3 * unit, 3 * unit]}


def model_config(ids: dict[str, int], head_size: int = 16) -> dict:
    """config.json in the flat layout of the published Qwen2-VL configs."""
    text = text_dims(head_size)
    mrope = text.pop("mrope_section")
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        **text,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": text["num_hidden_layers"],
        "model_type": "qwen2_vl",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": dict(VISION),
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "vocab_size": _vocab_size(),
    }


def generation_config(ids: dict[str, int]) -> dict:
    """generation_config.json with the published sampling defaults, on the tiny ids."""
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "repetition_penalty": 1.0,
        "temperature": 0.01,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.37.0",
    }


def _checkpoint_name(name: str) -> str:
    """transformers 5 module names -> the tensor names stored in the published checkpoints."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def random_weights(config: dict, seed: int) -> dict:
    """Random bf16 tensors for every parameter, by stored name (lm_head is tied, not stored).

    Matrices get std 1/sqrt(fan_in) and the embeddings a small std: with the usual 0.02
    everywhere the 64-wide layers barely touch the residual stream, and the tied head only
    echoes the last input token ("\\n\\n\\n..."). This way the greedy output is varied and
    depends on the image; padding rows are zero (never predicted) and <|im_end|> is likelier."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig.from_dict(json.loads(json.dumps(config)))  # it edits what it is given
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    norms = {f"{m_name}.{p_name}" for m_name, module in model.named_modules()
             if "Norm" in type(module).__name__ for p_name, _ in module.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n != "lm_head.weight"}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name in norms:
            value = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("embed_tokens.weight"):
            value = torch.randn(shape, generator=gen) * EMBED_STD
            value[LEARNED_VOCAB + len(SPECIAL_TOKENS):] = 0  # padding rows: never predicted
            value[_ids()["<|im_end|>"]] *= IM_END_SCALE
        elif len(shape) >= 2:  # linear and conv weights: keep the activation scale
            value = torch.randn(shape, generator=gen) * math.prod(shape[1:]) ** -0.5
        else:
            value = torch.zeros(shape)
        tensors[_checkpoint_name(name)] = value.to(torch.bfloat16).contiguous()
    return tensors


def _save(save_file, tensors: dict, path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates files private to the owner; the others are 0644


def save_weights(out: Path, tensors: dict, shards: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    if shards == 1:
        _save(save_file, tensors, out / "model.safetensors")
        return
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    done, index = 0, 0
    for pos, name in enumerate(names):  # in name order, about total/shards bytes a shard
        index = min(shards - 1, done * shards // total, index + 1 if groups[index] else index)
        index = max(index, shards - (len(names) - pos))  # leave a tensor for every later shard
        groups[index].append(name)
        done += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        _save(save_file, {n: tensors[n] for n in group}, out / file)
        weight_map.update({n: file for n in group})
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def make_tiny_model(out_dir: Path, seed: int = 0, shards: int = 1, head_size: int = 16) -> Path:
    """Write the tiny checkpoint into out_dir (created if needed) and return it."""
    if shards < 1:  # before the (slower) weights
        raise ValueError("shards must be at least 1")
    ids = _ids()
    config = model_config(ids, head_size)
    tensors = random_weights(config, seed)
    if not 1 <= shards <= len(tensors):
        raise ValueError(f"shards must be between 1 and {len(tensors)} (the number of tensors)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if write_tokenizer(out) != ids:
        raise RuntimeError("the trained tokenizer put the special tokens elsewhere")
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config(ids))
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    save_weights(out, tensors, shards)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--head-size", type=int, default=16, choices=(16, 32, 64),
                        help="text attention head size (vLLM's CPU attention needs 32 or 64)")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_model(args.out_dir, seed=args.seed, shards=args.shards,
                              head_size=args.head_size)
    except ValueError as error:
        parser.error(f"--shards: {error}")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
