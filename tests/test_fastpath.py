"""qvl's decode loop (qwenvl_cli.engine.fastpath, decode_step, sampling) against transformers' generate.

Correctness first: on the tiny checkpoint (float32, CPU) the qvl loop must give the token ids
of ``model.generate`` for greedy decoding and, with a seed, for sampling (top-p, repetition
penalty), at batch 1 and for left-padded batches, with the dynamic and the static cache.
The CUDA-graph and torch.compile steps are checked on CPU where possible (the step traces as
one graph; the inductor-compiled step, marked slow) and on a GPU under the ``gpu`` marker.
"""

from __future__ import annotations

import threading
import types

import pytest

from qwenvl_cli.engine import fastpath
from qwenvl_cli.errors import UsageError

# --- resolve: what "auto" means (pure) --------------------------------------------------------


def _opts(**kw):
    base = dict(decode_loop="auto", compile="auto", static_cache="auto", gpu_preprocess="auto",
                warmup=False, model_format="pytorch")
    return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw,on_gpu,single,expected", [
    ({}, False, True, ("qvl", "eager", False)),
    ({}, True, True, ("qvl", "cuda-graph", True)),
    ({"warmup": True}, True, True, ("qvl", "compile", True)),
    ({"model_format": "awq"}, True, True, ("qvl", "eager", True)),
    ({}, True, False, ("qvl", "eager", True)),
    ({"compile": "off"}, True, True, ("qvl", "eager", True)),
    ({"compile": "off", "static_cache": "on"}, True, True, ("qvl", "static", True)),
    ({"static_cache": "on"}, False, True, ("qvl", "static", False)),
    ({"compile": "on"}, False, True, ("qvl", "compile", False)),
    ({"decode_loop": "qvl"}, False, True, ("qvl", "eager", False)),
    ({"decode_loop": "generate"}, True, True, ("generate", "eager", True)),
    ({"gpu_preprocess": "off"}, True, True, ("qvl", "cuda-graph", False)),
])
def test_resolve_decides_auto(kw, on_gpu, single, expected):
    config = fastpath.resolve(_opts(**kw), on_gpu, single)
    assert (config.loop, config.step, config.gpu_preprocess) == expected


@pytest.mark.parametrize("kw,on_gpu,single,fragment", [
    ({"compile": "fast"}, True, True, "unknown --compile 'fast'"),
    ({"decode_loop": "vllm"}, True, True, "unknown --decode-loop"),
    ({"decode_loop": "generate", "compile": "on"}, True, True, "need qvl's decode loop"),
    ({"compile": "graphs"}, False, True, "needs a CUDA GPU"),
    ({"compile": "on"}, True, False, "needs the model on one device"),
    ({"compile": "on", "static_cache": "off"}, True, True, "needs the static KV cache"),
])
def test_resolve_rejects_impossible_combinations(kw, on_gpu, single, fragment):
    with pytest.raises(UsageError, match=fragment):
        fastpath.resolve(_opts(**kw), on_gpu, single)


def test_flash_attention_stays_on_the_vision_tower_with_a_static_cache():
    config = fastpath.resolve(_opts(), True, True, attn="flash_attention_2")
    assert fastpath.attn_implementation("flash_attention_2", config) == {
        "": "flash_attention_2", "text_config": "qvl_sdpa", "vision_config": "flash_attention_2"}
    eager = fastpath.resolve(_opts(compile="off"), True, True, attn="flash_attention_2")
    assert fastpath.attn_implementation("flash_attention_2", eager) == "flash_attention_2"


def test_buckets_are_powers_of_two_up_to_the_context():
    from qwenvl_cli.engine.decode_step import bucket, buckets_up_to

    assert [bucket(n) for n in (1, 256, 257, 1300, 1557, 4096, 4097)] == [256, 256, 512, 2048, 2048, 4096, 8192]
    assert bucket(30000, limit=32769) == 32768
    assert bucket(32769, limit=32769) == 32769 + (-32769 % 256)
    assert buckets_up_to(2000) == [256, 512, 1024, 2048]


# --- the loop against generate (tiny model, CPU) -----------------------------------------------

KW = dict(max_new_tokens=24, pad_token_id=None, eos_token_id=None)
GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
SAMPLED = dict(do_sample=True, temperature=1.0, top_k=0, top_p=0.9, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def model(tiny_model):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def reference(tiny_model):
    """A second copy that only ever runs transformers' generate (static decoders move the
    language model of ``model`` onto qvl_sdpa)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    return [Image.effect_noise((112, 84), 60).convert("RGB"), Image.effect_noise((56, 84), 90).convert("RGB")]


def _text(processor, question, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.fixture(scope="module")
def prompts(processor, images):
    single = processor(text=[_text(processor, "Describe this image.")], images=images[:1], return_tensors="pt")
    batch = processor(text=[_text(processor, "Describe this image."), _text(processor, "Tell me a story.", False),
                            _text(processor, "What is it?")], images=images, padding=True, return_tensors="pt")
    assert int(batch["attention_mask"][1].sum()) < batch["input_ids"].shape[1]  # really left-padded
    return {"single": single, "batch": batch}


def _ids(model, processor):
    ids = {"pad_token_id": model.generation_config.pad_token_id,
           "eos_token_id": model.generation_config.eos_token_id}
    return dict(KW, **ids)


def _both(model, processor, decoder, inputs, gen, seed=0, **extra):
    import torch

    kw = dict(_ids(model, processor), **gen, **extra)
    assert model is not decoder.model or decoder.pool is None, "compare against a model generate alone uses"
    with torch.inference_mode():
        torch.manual_seed(seed)
        ref = model.generate(**inputs, **kw)
        torch.manual_seed(seed)
        out = decoder.generate(**inputs, **kw)
    return ref, out


@pytest.mark.parametrize("step", ["eager", "static"])
@pytest.mark.parametrize("which", ["single", "batch"])
@pytest.mark.parametrize("gen", [GREEDY, dict(GREEDY, min_new_tokens=24), {}, SAMPLED],
                         ids=["greedy", "ignore-eos", "checkpoint-defaults", "seeded-top-p"])
def test_qvl_loop_gives_the_tokens_of_generate(model, reference, processor, prompts, step, which, gen):
    decoder = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", step), 32768)
    ref, out = _both(reference, processor, decoder, prompts[which], gen, seed=7)
    assert out.shape == ref.shape
    assert out.tolist() == ref.tolist()
    assert decoder.last["runner"] == step


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_eager_step_keeps_the_padding_mask_of_each_attention(tiny_model, processor, prompts, attn):
    """The dynamic-cache step builds sdpa's boolean mask itself and leaves others to transformers."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32,
                                                            attn_implementation=attn).eval()
    decoder = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", "eager"), 32768)
    ref, out = _both(model, processor, decoder, prompts["batch"], dict(GREEDY, min_new_tokens=24))
    assert out.tolist() == ref.tolist()


def test_a_static_decoder_puts_the_language_model_on_qvl_sdpa(tiny_model):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", "static"), 32768)
    assert model.config.get_text_config()._attn_implementation == "qvl_sdpa"
    assert model.model.visual.config._attn_implementation == "eager"


def test_some_rows_end_early_and_are_padded_like_generate(model, reference, processor, prompts):
    import torch

    decoder = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", "static"), 32768)
    ref, out = _both(reference, processor, decoder, prompts["batch"], GREEDY, max_new_tokens=40)
    eos = set(model.generation_config.eos_token_id)
    new = out[:, prompts["batch"]["input_ids"].shape[1]:]
    ended = [any(int(t) in eos for t in row) for row in new]
    assert any(ended), "the tiny model should end at least one answer within 40 tokens"
    assert torch.equal(out, ref)


class _Recorder:
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ends += 1


def test_streamer_gets_the_prompt_then_one_token_per_row_per_step(model, processor, prompts):
    import torch

    decoder = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", "static"), 32768)
    inputs = prompts["batch"]
    streamer = _Recorder()
    with torch.inference_mode():
        out = decoder.generate(**inputs, **_ids(model, processor), **GREEDY, min_new_tokens=24, streamer=streamer)
    assert streamer.ends == 1
    assert streamer.puts[0] == inputs["input_ids"].tolist()
    steps = torch.tensor(streamer.puts[1:])  # (steps, B)
    assert steps.shape == (24, 3)
    assert steps.T.tolist() == out[:, inputs["input_ids"].shape[1]:].tolist()


def test_stopping_criteria_stop_at_the_same_token_as_generate(model, reference, processor, prompts):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterFive(StoppingCriteria):
        def __init__(self, prompt):
            self.prompt = prompt

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.prompt >= 5, dtype=torch.bool,
                              device=input_ids.device)

    decoder = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", "static"), 32768)
    inputs = prompts["single"]
    criteria = StoppingCriteriaList([AfterFive(inputs["input_ids"].shape[1])])
    ref, out = _both(reference, processor, decoder, inputs, dict(GREEDY, min_new_tokens=24), stopping_criteria=criteria)
    assert out.shape[1] - inputs["input_ids"].shape[1] == 5
    assert out.tolist() == ref.tolist()


def test_static_caches_are_reused_across_prompt_lengths(model, reference, processor, prompts):
    decoder = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", "static"), 32768)
    _both(reference, processor, decoder, prompts["single"], GREEDY)
    slot = next(iter(decoder.pool.slots.values()))
    text_only = processor(text=[_text(processor, "Hello there, how are you today?", False)], return_tensors="pt")
    _both(reference, processor, decoder, text_only, GREEDY)
    assert list(decoder.pool.slots) == [(1, 256)]
    assert next(iter(decoder.pool.slots.values())) is slot and not slot.busy


def test_the_static_step_traces_as_one_graph(model):
    """No graph break under dynamo means no data-dependent Python in the step: nothing reads a
    device value on the host, so the step can be captured as a CUDA graph."""
    import torch

    from qwenvl_cli.engine.decode_step import CachePool, compile_step

    slot = CachePool(model).acquire(2, 256)
    step = compile_step(torch, model, backend="eager", dynamic=False)  # fullgraph=True: a break raises
    with torch.inference_mode():
        logits = step(slot.cache, slot.tokens, slot.pos, slot.attn2d)
    assert logits.shape == (2, model.config.text_config.vocab_size)
    assert int(slot.cache.layers[0].cumulative_length) == 1


@pytest.mark.slow
def test_compiled_step_matches_generate_without_recompiling_for_new_prompts(model, reference, processor, prompts):
    """One compilation (batch and cache length are dynamic) serves every prompt length and
    cache bucket; the answers are generate's."""
    import torch
    from torch._dynamo.utils import counters

    decoder = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", "compile"), 32768)
    seconds = decoder.warmup((1, 2), 512)
    assert seconds > 0
    assert [(s["batch"], s["length"]) for s in decoder.pool.describe()] == [(1, 256), (1, 512)]  # batch 2 dropped
    compiled = counters["stats"]["unique_graphs"]
    text_only = processor(text=[_text(processor, "Tell me a long story about a red ball.", False)],
                          return_tensors="pt")
    for inputs, new in ((prompts["single"], 24), (text_only, 300)):  # buckets 256 and 512
        ref, out = _both(reference, processor, decoder, inputs, dict(GREEDY, min_new_tokens=new), max_new_tokens=new)
        assert torch.equal(out, ref)
    assert [s["length"] for s in decoder.pool.describe()] == [256, 512]
    assert all(s["fallback"] is None for s in decoder.pool.describe())
    assert counters["stats"]["unique_graphs"] == compiled, "a new prompt length recompiled the step"


# --- through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_image(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("img") / "noise.png"
    images[0].save(path)
    return str(path)


def _engine(tiny_model, **kw):
    from qwenvl_cli.engine.engine import Engine
    from qwenvl_cli.engine.options import EngineOptions

    return Engine.load(tiny_model, EngineOptions(device="cpu", dtype="float32", **kw))


def test_engine_streams_the_same_answers_through_either_loop(tiny_model, noisy_image):
    from qwenvl_cli.generation import GenerationParams, collect

    plain = _engine(tiny_model, decode_loop="generate")
    fast = _engine(tiny_model, decode_loop="qvl", static_cache="on")
    assert plain.describe()["decode"] == "transformers generate"
    assert fast.describe()["decode"] == "qvl loop, static step"
    messages = [{"role": "user", "content": [{"type": "image", "image": noisy_image},
                                             {"type": "text", "text": "Describe this image."}]}]
    for params in (GenerationParams(max_tokens=20, temperature=0), GenerationParams(max_tokens=12, ignore_eos=True),
                   GenerationParams(max_tokens=16, temperature=1.0, top_k=0, top_p=0.9, seed=3)):
        a, b = collect(plain.stream(messages, params)), collect(fast.stream(messages, params))
        assert (b.text, b.finish_reason, b.usage) == (a.text, a.finish_reason, a.usage)
    jobs = [fast.job([{"role": "user", "content": q}], GenerationParams(max_tokens=10, temperature=0))
            for q in ("Hello there.", "Tell me a story about a cat.")]
    ref = [collect(plain.stream([{"role": "user", "content": q}], GenerationParams(max_tokens=10, temperature=0)))
           for q in ("Hello there.", "Tell me a story about a cat.")]
    got = {0: [], 1: []}
    for i, chunk in fast.run_jobs(jobs):
        got[i].append(chunk)
    for i in (0, 1):
        assert collect(got[i]).text == ref[i].text


def test_engine_cancel_stops_the_qvl_loop(tiny_model):
    from qwenvl_cli.generation import GenerationParams

    fast = _engine(tiny_model, decode_loop="qvl", static_cache="on")
    cancel = threading.Event()
    seen = 0
    chunks = []
    for chunk in fast.stream([{"role": "user", "content": "Tell me a story."}],
                             GenerationParams(max_tokens=200, ignore_eos=True), cancel=cancel):
        chunks.append(chunk)
        seen += 1
        if seen == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].usage.completion_tokens < 20


# --- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("step", ["cuda-graph", "compile"])
def test_gpu_steps_match_the_eager_static_step(tiny_model, step):
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32,
                                                            attn_implementation="sdpa").to("cuda").eval()
    processor = AutoProcessor.from_pretrained(tiny_model)
    inputs = processor(text=[_text(processor, "Tell me a story.", False), _text(processor, "Hi", False)],
                       padding=True, return_tensors="pt").to("cuda")
    kw = dict(_ids(model, processor), **GREEDY, min_new_tokens=24)
    eager = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", "static"), 32768)
    fast = fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", step), 32768)
    fast.warmup((2,), 256)
    with torch.inference_mode():
        ref = eager.generate(**inputs, **kw)
        for _ in range(2):  # the second run replays what the first captured
            assert torch.equal(fast.generate(**inputs, **kw), ref)
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside a step raises
        try:
            runner = fast.runner(2, 64)
            runner.step(runner.tokens)
            runner.release()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_the_pool_keeps_one_idle_batched_cache_and_the_recent_single_ones(model):
    from qwenvl_cli.engine.decode_step import CachePool

    pool = CachePool(model, keep=3)
    def held():
        return [(s["batch"], s["length"]) for s in pool.describe()]

    for batch, length in [(1, 256), (4, 256), (8, 256)]:
        pool.acquire(batch, length).release()
    assert held() == [(1, 256), (8, 256)]  # the idle (4, 256) went when (8, 256) came back
    for length in (512, 1024, 2048):
        pool.acquire(1, length).release()
    assert held() == [(1, 512), (1, 1024), (1, 2048)]  # then the least recently used
    busy = pool.acquire(2, 256)
    pool.acquire(4, 256).release()
    assert (2, 256) in held()  # busy caches stay
    busy.release()


def test_qvl_sdpa_folds_grouped_heads_without_copying_keys_and_values(model, monkeypatch):
    """Same numbers as transformers' sdpa; and traced by dynamo (as under torch.compile) the
    decode step never calls repeat_kv, which transformers' sdpa does there."""
    import torch
    from transformers.integrations import sdpa_attention

    from qwenvl_cli.engine import attention
    from qwenvl_cli.engine.decode_step import CachePool, compile_step

    module = model.model.language_model.layers[0].self_attn
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 50, 16), torch.randn(3, 2, 50, 16)
    mask = torch.rand(3, 1, 1, 50) > 0.3
    mask[:, :, :, 0] = True
    ours, _ = attention.qvl_sdpa(module, q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention.sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert torch.allclose(ours, theirs, atol=1e-6)

    fastpath.make_decoder(model, fastpath.DecodeConfig("qvl", "static"), 32768)  # text on qvl_sdpa

    def no_repeat(*args, **kwargs):
        raise AssertionError("repeat_kv copied the cache")

    monkeypatch.setattr(sdpa_attention, "repeat_kv", no_repeat)
    slot = CachePool(model).acquire(2, 256)
    with torch.inference_mode():
        compile_step(torch, model, backend="eager", dynamic=False)(slot.cache, slot.tokens, slot.pos, slot.attn2d)
