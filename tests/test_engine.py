"""The engine on the tiny checkpoint: inputs identical to the Qwen2-VL README pipeline,
greedy tokens identical to model.generate, every generation option, streaming,
cancellation, errors and batches."""

from __future__ import annotations

import base64
import threading
import time

import pytest

from media_fixtures import make_frames, make_image, make_video
from qwenvl_cli.engine.engine import Engine
from qwenvl_cli.engine.options import EngineOptions
from qwenvl_cli.errors import EngineError, MediaError, OutOfMemory, PromptTooLarge, PromptTooLong
from qwenvl_cli.generation import Answer, GenerationParams, collect

IMG = {"min_pixels": 3136, "max_pixels": 1280 * 28 * 28}  # the same sizing for qvl and the reference
GREEDY = GenerationParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.load(tiny_model, EngineOptions(device="cpu"))


@pytest.fixture(scope="module", params=["qvl", "generate"])
def any_loop(request, tiny_model, engine):
    """The engine with qvl's decode loop (the default: on the calling thread) and with
    transformers' generate (on a worker thread)."""
    if request.param == "qvl":
        return engine
    return Engine.load(tiny_model, EngineOptions(device="cpu", decode_loop="generate"))


def fail_forward_after(engine, monkeypatch, calls, exc):
    """Make the model's forward raise ``exc`` from its ``calls``-th call on (mid-answer)."""
    import functools

    real = engine.model.forward
    count = {"n": 0}

    @functools.wraps(real)  # generate checks its keyword arguments against forward's signature
    def forward(*args, **kwargs):
        count["n"] += 1
        if count["n"] >= calls:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-media")
    red = make_image(root / "red.png", 300, 200, (220, 20, 20))
    blue = make_image(root / "blue.jpg", 120, 400, (20, 20, 220))
    return {"red": str(red), "blue": str(blue), "clip": str(make_video(root / "clip.mp4", 3, 8)),
            "frames": [str(p) for p in make_frames(root / "frames", 6)],
            "data": "data:image/png;base64," + base64.b64encode(red.read_bytes()).decode()}


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(t):
    return {"type": "text", "text": t}


CASES = {
    "one image": lambda m: [user({"type": "image", "image": m["red"], **IMG}, text("What is this?"))],
    "two images": lambda m: [user({"type": "image", "image": m["red"], **IMG},
                                  {"type": "image", "image": m["blue"], **IMG}, text("Compare them."))],
    "data uri": lambda m: [user({"type": "image", "image": m["data"], **IMG}, text("What colour?"))],
    "video file": lambda m: [user({"type": "video", "video": m["clip"]}, text("What happens?"))],
    "frame list": lambda m: [user({"type": "video", "video": m["frames"]}, text("Describe."))],
    "video fps and max frames": lambda m: [user({"type": "video", "video": m["clip"], "fps": 4.0,
                                                 "max_frames": 6}, text("Describe."))],
    "multi-turn": lambda m: [
        {"role": "system", "content": [text("Be brief.")]},
        user({"type": "image", "image": m["red"], **IMG}, text("What is this?")),
        {"role": "assistant", "content": [text("A red picture.")]},
        user({"type": "image", "image": m["blue"], **IMG}, text("And this one?"))],
}


def reference_inputs(engine, messages):
    """The Qwen2-VL README pipeline. transformers 5.23 refuses qwen-vl-utils' per-video fps
    list, so the reference passes the rest of its video kwargs (do_sample_frames=False)."""
    from qwen_vl_utils import process_vision_info

    processor = engine.processor
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True)
    kwargs = {k: v for k, v in video_kwargs.items() if k != "fps"} if videos else {}
    return processor(text=[prompt], images=images, videos=videos, padding=True, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_inputs_identical_to_the_reference_pipeline(engine, media, case):
    import torch

    messages = CASES[case](media)
    ours = engine.prepare(messages).inputs
    ref = reference_inputs(engine, messages)
    assert set(ours.keys()) == set(ref.keys())
    for key in ref.keys():
        assert torch.equal(ours[key], ref[key]), key
    expected = {"input_ids", "attention_mask"}
    expected |= {"pixel_values", "image_grid_thw"} if "image" in case or "data" in case or "turn" in case else set()
    expected |= {"pixel_values_videos", "video_grid_thw"} if "video" in case or "frame" in case else set()
    assert expected <= set(ours.keys())


@pytest.mark.parametrize("case", ["one image", "video file", "multi-turn"])
def test_greedy_tokens_equal_reference_generate(engine, media, case):
    import torch

    messages = CASES[case](media)
    ref = reference_inputs(engine, messages)
    with torch.inference_mode():
        out = engine.model.generate(**ref, max_new_tokens=24, do_sample=False, temperature=None,
                                    top_p=None, top_k=None)
    new = out[0, ref["input_ids"].shape[-1]:].tolist()
    expected = engine.processor.tokenizer.decode(new, skip_special_tokens=True)
    answer = collect(engine.stream(messages, GREEDY))
    assert answer.text == expected
    assert answer.usage.completion_tokens == len(new)
    assert answer.usage.prompt_tokens == ref["input_ids"].shape[-1]


def story():
    return [user(text("Tell me a story."))]  # the tiny model does not end this one early


def test_streaming_chunks_add_up_and_report_usage_and_timings(engine):
    chunks = list(engine.stream(story(), GREEDY))
    texts = [c.text for c in chunks if c.text]
    final = chunks[-1]
    assert len(texts) > 1 and all(c.finish_reason is None for c in chunks[:-1])
    assert final.finish_reason == "length" and final.usage.completion_tokens == 24
    assert 0 < final.timings.time_to_first_token <= final.timings.total
    assert final.timings.tokens_per_second > 0
    assert "".join(texts) == collect(engine.stream(story(), GREEDY)).text


def test_max_tokens_and_stop(engine):
    full = collect(engine.stream(story(), GREEDY.merged(max_tokens=40))).text
    five = collect(engine.stream(story(), GREEDY.merged(max_tokens=5)))
    assert five.usage.completion_tokens == 5 and five.finish_reason == "length"
    assert full.startswith(five.text)
    cut = full[len(full) // 3: len(full) // 3 + 3]
    stopped = collect(engine.stream(story(), GREEDY.merged(max_tokens=40, stop=(cut,))))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[:full.index(cut)]


def test_sampling_options(engine):
    greedy = collect(engine.stream(story(), GREEDY)).text
    sample = GenerationParams(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0)
    a = collect(engine.stream(story(), sample.merged(seed=1))).text
    b = collect(engine.stream(story(), sample.merged(seed=1))).text
    c = collect(engine.stream(story(), sample.merged(seed=2))).text
    assert a == b and a != c  # the seed makes sampling repeatable
    # the checkpoint's generation_config (top_k 1) applies where nothing overrides it
    assert collect(engine.stream(story(), GenerationParams(max_tokens=24, temperature=1.0, seed=3))).text == greedy
    assert collect(engine.stream(story(), sample.merged(top_k=1, seed=5))).text == greedy
    assert collect(engine.stream(story(), GREEDY.merged(repetition_penalty=2.0))).text != greedy
    assert engine.sampling_note(GenerationParams(temperature=0.7)) is not None
    assert engine.sampling_note(sample) is None


def generate_threads():
    return [t for t in threading.enumerate() if t.name == "qvl-generate"]


def test_closing_the_stream_stops_generation(any_loop):
    engine = any_loop
    stream = engine.stream(story(), GenerationParams(temperature=0, max_tokens=2000, ignore_eos=True))
    next(c for c in stream if c.text)
    start = time.perf_counter()
    stream.close()
    assert time.perf_counter() - start < 5
    assert generate_threads() == []
    cancel = threading.Event()
    answer = Answer()
    for chunk in engine.stream(story(), GenerationParams(temperature=0, max_tokens=2000, ignore_eos=True),
                               cancel=cancel):
        answer.add(chunk)
        cancel.set()
    assert answer.finish_reason == "cancelled" and answer.usage.completion_tokens < 2000
    assert generate_threads() == []


def test_errors_while_generating_reach_the_caller(any_loop, monkeypatch):
    fail_forward_after(any_loop, monkeypatch, 3, RuntimeError("kernel exploded"))
    chunks = []
    with pytest.raises(EngineError, match="generation failed: RuntimeError: kernel exploded"):
        for chunk in any_loop.stream(story(), GREEDY):
            chunks.append(chunk)
    assert chunks and chunks[-1].finish_reason is None  # text came first, then the error
    assert generate_threads() == []


def test_out_of_memory_is_one_line_with_figures_and_the_engine_still_serves(any_loop, monkeypatch):
    import torch

    fail_forward_after(any_loop, monkeypatch, 2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"))
    with pytest.raises(OutOfMemory) as info:
        collect(any_loop.stream(story(), GREEDY))
    assert "out of memory on cpu while generating for 1 request(s) of" in info.value.message
    assert "prompt tokens" in info.value.message and "-f awq" in info.value.hint
    monkeypatch.undo()
    assert collect(any_loop.stream(story(), GREEDY)).usage.completion_tokens == 24
    assert generate_threads() == []


def test_the_default_loop_generates_on_the_calling_thread(engine, monkeypatch):
    import functools

    seen = set()
    real = engine.model.forward

    @functools.wraps(real)
    def forward(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward)
    collect(engine.stream(story(), GREEDY))
    assert seen == {threading.current_thread().name}


def test_prompt_longer_than_the_context(tiny_model, media):
    small = Engine.load(tiny_model, EngineOptions(device="cpu"), context_length=60)
    with pytest.raises(PromptTooLong) as info:
        small.prepare(CASES["one image"](media))
    assert "tokens long; the model's context length is 60" in info.value.message
    with pytest.raises(MediaError):
        small.prepare([user({"type": "image", "image": "/no/such.png"}, text("x"))])


def test_batch_answers_equal_single_answers(engine, media):
    convs = [story(), CASES["one image"](media), CASES["two images"](media), CASES["video file"](media),
             [user(text("Hi"))]]
    params = [GREEDY.merged(max_tokens=n) for n in (24, 10, 16, 12, 20)]
    single = [collect(engine.stream(c, p)) for c, p in zip(convs, params)]
    answers = [Answer() for _ in convs]
    for i, chunk in engine.run_jobs([engine.job(c, p) for c, p in zip(convs, params)]):
        answers[i].add(chunk)
    for one, batched in zip(single, answers):
        assert batched.text == one.text
        assert (batched.finish_reason, batched.usage) == (one.finish_reason, one.usage)
    with pytest.raises(ValueError, match="share their sampling"):
        list(engine.run_jobs([engine.job(story(), GREEDY), engine.job(story(), GREEDY.merged(seed=3))]))


def test_the_loaded_model_knows_its_figures_for_memory_checks(engine):
    assert engine.dims is not None
    assert (engine.dims.hidden_size, engine.dims.num_hidden_layers, engine.dims.vision.embed_dim) == (64, 2, 32)
    assert engine.dims.total_parameters == sum(p.numel() for p in engine.model.parameters())


@pytest.mark.gpu
def test_a_prompt_too_large_for_free_gpu_memory_is_refused_with_figures(tiny_model, media, monkeypatch):
    import torch

    gpu = Engine.load(tiny_model, EngineOptions(device="cuda"))
    assert collect(gpu.stream(CASES["one image"](media), GREEDY)).usage.completion_tokens > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    with pytest.raises(PromptTooLarge, match="GiB more; cuda:0 has 0.0 GiB free"):
        gpu.job(CASES["one image"](media), GREEDY)


def test_visual_tokens_follow_the_checkpoints_own_processor_limit(tiny_model, tmp_path):
    """A checkpoint whose preprocessor_config caps images below qvl's --max-pixels: the info
    reports the tokens the model really gets (the image pads in the prompt), and says that
    a larger --max-pixels has no effect."""
    import json
    import shutil

    capped = tmp_path / "capped"
    shutil.copytree(tiny_model, capped)
    config = json.loads((capped / "preprocessor_config.json").read_text())
    config.update(min_pixels=3136, max_pixels=28 * 28 * 16)  # 16 visual tokens at most
    (capped / "preprocessor_config.json").write_text(json.dumps(config))
    image = make_image(tmp_path / "wide.png", 448, 336)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "?"}]}]
    for folder, capped_here in ((capped, True), (tiny_model, False)):
        engine = Engine.load(folder, EngineOptions(device="cpu"))
        prepared = engine.prepare(messages)
        [info] = prepared.media
        pad = engine.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert info.tokens == int((prepared.inputs["input_ids"] == pad).sum())  # what the model got
        if capped_here:
            assert info.tokens <= 16 and info.processor_max_pixels == 28 * 28 * 16
            assert info.resized_width * info.resized_height <= 28 * 28 * 16
            assert "has no effect" in info.cap_note() and f"{info.tokens} visual tokens" in info.describe()
        else:
            assert info.processor_max_pixels is None and info.tokens == 192  # 448x336 / 28^2
