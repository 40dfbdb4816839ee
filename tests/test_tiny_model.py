"""The tiny Qwen2-VL checkpoint: real repository layout, real prompt format, and the reference
pipeline (AutoProcessor + qwen-vl-utils + generate) running on it on CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, load_script
from media_fixtures import make_frames, make_image, make_video

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
            "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
            "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
FILES = {"config.json", "generation_config.json", "preprocessor_config.json", "chat_template.json",
         "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return {"red": make_image(root / "red.png", 64, 48, (220, 20, 20)),
            "blue": make_image(root / "blue.jpg", 100, 80, (20, 20, 220)),
            "clip": make_video(root / "clip.mp4", seconds=2, fps=8, width=64, height=48),
            "frames": make_frames(root / "frames", 6, 64, 48)}


# -- files ------------------------------------------------------------------------------------

def test_has_the_files_of_the_real_repository_and_is_small(tiny_model):
    names = {p.name for p in tiny_model.iterdir()}
    assert names == FILES | {"model.safetensors"}
    assert sum(p.stat().st_size for p in tiny_model.iterdir()) < 1_000_000


def test_config_ids_match_the_tokenizer(tiny_model):
    config = _json(tiny_model / "config.json")
    added = {t["content"]: t["id"] for t in _json(tiny_model / "tokenizer.json")["added_tokens"]}
    assert list(added) == list(SPECIALS)
    ids = list(added.values())
    assert ids == list(range(ids[0], ids[0] + len(SPECIALS)))  # appended after the learned vocab
    assert ids[0] == len(_json(tiny_model / "vocab.json"))
    assert config["vocab_size"] >= ids[-1] + 1 and config["vocab_size"] % 64 == 0
    assert config["vocab_size"] < 2048
    assert (config["image_token_id"], config["video_token_id"]) == (added["<|image_pad|>"],
                                                                    added["<|video_pad|>"])
    assert config["vision_start_token_id"] == added["<|vision_start|>"]
    assert config["vision_end_token_id"] == added["<|vision_end|>"]
    assert config["bos_token_id"] == config["pad_token_id"] == added["<|endoftext|>"]
    assert config["eos_token_id"] == added["<|im_end|>"]
    assert config["model_type"] == "qwen2_vl" and config["torch_dtype"] == "bfloat16"
    assert config["max_position_embeddings"] == 32768
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}  # as published
    assert sum(config["rope_scaling"]["mrope_section"]) * 2 == (
        config["hidden_size"] // config["num_attention_heads"])
    gen = _json(tiny_model / "generation_config.json")
    assert gen["eos_token_id"] == [added["<|im_end|>"], added["<|endoftext|>"]]
    assert (gen["do_sample"], gen["top_k"], gen["top_p"], gen["temperature"]) == (True, 1, 0.001, 0.01)
    tok_config = _json(tiny_model / "tokenizer_config.json")
    assert tok_config["padding_side"] == "left" and tok_config["model_max_length"] == 32768
    assert {int(k): v["content"] for k, v in tok_config["added_tokens_decoder"].items()} == {
        v: k for k, v in added.items()}
    assert tok_config["chat_template"] == _json(tiny_model / "chat_template.json")["chat_template"]
    pre = _json(tiny_model / "preprocessor_config.json")
    assert (pre["min_pixels"], pre["max_pixels"], pre["image_processor_type"]) == (
        3136, 12845056, "Qwen2VLImageProcessor")


def test_same_seed_gives_the_same_bytes_and_another_seed_other_weights(tiny_model, tmp_path):
    make = load_script("make_tiny_model").make_tiny_model
    again, other = make(tmp_path / "again", seed=0), make(tmp_path / "other", seed=1)
    for name in FILES | {"model.safetensors"}:
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_model / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()


def test_weights_use_the_published_tensor_names_and_bf16(tiny_model):
    from safetensors import safe_open

    with safe_open(tiny_model / "model.safetensors", "pt") as f:
        names = set(f.keys())
        dtypes = {str(f.get_slice(n).get_dtype()) for n in names}
    assert "model.embed_tokens.weight" in names and "visual.merger.mlp.0.weight" in names
    assert "lm_head.weight" not in names  # tied, as in the 2B checkpoint
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in names)
    assert dtypes == {"BF16"}


def test_sharded_checkpoint_has_a_real_index_and_the_same_weights(tiny_model, tiny_model_sharded):
    from safetensors.torch import load_file

    index = _json(tiny_model_sharded / "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors = {}
    for name in files:
        part = load_file(tiny_model_sharded / name)
        assert part and all(index["weight_map"][k] == name for k in part)
        tensors.update(part)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    single = load_file(tiny_model / "model.safetensors")
    assert set(single) == set(tensors) and all(single[k].equal(tensors[k]) for k in single)


def test_cli_writes_a_sharded_model_and_rejects_bad_shards(tmp_path):
    script = str(REPO / "scripts" / "make_tiny_model.py")
    bad = subprocess.run([sys.executable, script, str(tmp_path / "bad"), "--shards", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--shards" in bad.stderr and not (tmp_path / "bad").exists()
    done = subprocess.run([sys.executable, script, str(tmp_path / "m"), "--seed", "3", "--shards", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    index = _json(tmp_path / "m" / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) == 3


# -- tokenizer and chat template ---------------------------------------------------------------

def test_tokenizer_round_trips_english_and_chinese_and_keeps_specials_whole(processor, tiny_model,
                                                                           tmp_path):
    from transformers import AutoTokenizer

    tok = processor.tokenizer
    text = "<|im_start|>user\nHello, world! 你好，图片里有一只猫。 It's 3.14 " + IMAGE + "<|im_end|>\n"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    specials = ("<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_end|>")
    assert [i for i in ids if i >= len(_json(tiny_model / "vocab.json"))] == [
        tok.convert_tokens_to_ids(t) for t in specials]
    for special in SPECIALS:
        assert tok(special).input_ids == [tok.convert_tokens_to_ids(special)]
    assert len(tok("The image shows a cat sitting on a table.").input_ids) < 15  # learned merges
    assert (tok.padding_side, tok.eos_token, tok.pad_token) == ("left", "<|im_end|>", "<|endoftext|>")
    # vocab.json + merges.txt alone give the same tokenizer
    slim = tmp_path / "slim"
    shutil.copytree(tiny_model, slim)
    (slim / "tokenizer.json").unlink()
    assert AutoTokenizer.from_pretrained(slim)(text).input_ids == ids


def _user(*items):
    return {"role": "user", "content": list(items)}


TEMPLATE_CASES = {
    "text": ([_user({"type": "text", "text": "Hello."})], {},
             SYSTEM + "<|im_start|>user\nHello.<|im_end|>\n<|im_start|>assistant\n"),
    "string content": ([{"role": "user", "content": "Hi"}], {},
                       SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "one image": ([_user({"type": "image", "image": "a.png"},
                         {"type": "text", "text": "Describe this image."})], {},
                  SYSTEM + "<|im_start|>user\n" + IMAGE
                  + "Describe this image.<|im_end|>\n<|im_start|>assistant\n"),
    "own system, image_url and video keys": (
        [{"role": "system", "content": "Be brief."},
         _user({"image_url": "http://x/a.png"}, {"video": "v.mp4"}, {"type": "text", "text": "?"})],
        {}, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + IMAGE + VIDEO
        + "?<|im_end|>\n<|im_start|>assistant\n"),
    "vision ids across turns": (
        [_user({"type": "image"}, {"type": "image"}, {"type": "text", "text": "A"}),
         {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
         _user({"type": "video"}, {"type": "image"}, {"type": "text", "text": "C"})],
        {"add_vision_id": True},
        SYSTEM + "<|im_start|>user\nPicture 1: " + IMAGE + "Picture 2: " + IMAGE + "A<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nVideo 1: " + VIDEO + "Picture 3: "
        + IMAGE + "C<|im_end|>\n<|im_start|>assistant\n"),
}


@pytest.mark.parametrize("case", TEMPLATE_CASES)
def test_chat_template_renders_the_real_prompt_format(processor, case):
    messages, extra, expected = TEMPLATE_CASES[case]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **extra)
    assert rendered == expected


def test_no_generation_prompt_ends_after_the_last_turn(processor):
    rendered = processor.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n"


# -- the reference pipeline -------------------------------------------------------------------

def _pipeline(processor, model, messages, max_new_tokens=16):
    from qwen_vl_utils import process_vision_info

    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info(messages)
    inputs = processor(text=[text], images=images, videos=videos, padding=True,
                       return_tensors="pt", cap_pixels_per_frame=True)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return inputs, out[:, inputs["input_ids"].shape[1]:], time.perf_counter() - start


PIPELINE_CASES = {
    "text": (lambda m: [_user({"type": "text", "text": "Hello there."})], 0, 0),
    "one image": (lambda m: [_user({"type": "image", "image": str(m["red"])},
                                   {"type": "text", "text": "Describe this image."})], 1, 0),
    "two images": (lambda m: [_user({"type": "image", "image": "file://" + str(m["red"])},
                                    {"type": "image", "image": str(m["blue"])},
                                    {"type": "text", "text": "Compare them."})], 2, 0),
    "video file": (lambda m: [_user({"type": "video", "video": str(m["clip"])},
                                    {"type": "text", "text": "Describe this video."})], 0, 1),
    "frame list": (lambda m: [_user({"type": "video", "video": [str(f) for f in m["frames"]]},
                                    {"type": "text", "text": "Describe this video."})], 0, 1),
}


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_reference_pipeline_generates_on_cpu(processor, model, media, case):
    build, n_images, n_videos = PIPELINE_CASES[case]
    inputs, new, seconds = _pipeline(processor, model, build(media))
    ids, kinds = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
    image_id, video_id = (processor.tokenizer.convert_tokens_to_ids(t)
                          for t in ("<|image_pad|>", "<|video_pad|>"))
    assert kinds.tolist() == [1 if i == image_id else 2 if i == video_id else 0 for i in ids.tolist()]
    if n_images:
        grid = inputs["image_grid_thw"]
        assert len(grid) == n_images and int((ids == image_id).sum()) == int(grid.prod(-1).sum()) // 4
    if n_videos:
        grid = inputs["video_grid_thw"]
        assert len(grid) == n_videos and int((ids == video_id).sum()) == int(grid.prod(-1).sum()) // 4
    assert 1 <= new.shape[1] <= 16
    assert new.max() < len(processor.tokenizer)  # never an id the tokenizer cannot decode
    assert seconds < 5  # about 0.05 s on a 2-core CPU; generous for a busy machine


def test_output_is_varied_and_depends_on_the_image(processor, model, media):
    def answer(image):
        _, new, _ = _pipeline(processor, model, [_user({"type": "image", "image": str(image)},
                                                       {"type": "text", "text": "Describe."})])
        return new[0].tolist()

    red, blue = answer(media["red"]), answer(media["blue"])
    assert red != blue
    assert len(set(red)) > 2  # not one token echoed over and over


def test_some_answers_end_with_im_end_and_others_run_to_the_limit(processor, model):
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    _, short, _ = _pipeline(processor, model, [{"role": "user", "content": "Hello there."}])
    _, long, _ = _pipeline(processor, model, [{"role": "user", "content": "Tell me a story."}])
    assert short.shape[1] < 16 and short[0, -1] == im_end
    assert long.shape[1] == 16 and im_end not in long[0].tolist()
