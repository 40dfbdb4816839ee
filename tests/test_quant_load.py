"""AWQ and GPTQ checkpoints loaded through qvl's engine: the vision tower stays 16-bit, the
logits stay close to the unquantized model's, the answers come out on CPU, and nothing of
the backend reaches stdout. Needs the backend (`pip install "qvl[quant]"`; CI: .ci/quant);
every test here skips without it. The bounds are explained in tests/test_quant.py."""

from __future__ import annotations


import pytest

from conftest import load_script, run_qvl
from media_fixtures import make_image
from test_quant import needs_backend, needs_gpu

FORMATS = ("awq", "gptq-int4", "gptq-int8")
pytestmark = needs_backend


@pytest.fixture(scope="session")
def fixtures(quantized_fixtures):
    return quantized_fixtures


MESSAGES_TEXT = "Describe this image."


def _inputs(engine, image):
    """The reference pipeline's inputs for one image prompt (processor + qwen-vl-utils)."""
    from qwen_vl_utils import process_vision_info

    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                             {"type": "text", "text": MESSAGES_TEXT}]}]
    text = engine.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, _videos = process_vision_info(messages)
    return messages, engine.processor(text=[text], images=images, return_tensors="pt")


def _logits(engine, inputs):
    import torch

    with torch.inference_mode():
        return engine.model(**inputs.to(engine.plan.input_device)).logits[0].float().cpu()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp("quant-media") / "x.png", 64, 48, (200, 30, 30))


@pytest.fixture(scope="module")
def engines(fixtures, tiny_model):
    """Engines loaded once per module, by name: the unquantized tiny model and each fixture."""
    from qwenvl_cli.engine.engine import Engine
    from qwenvl_cli.engine.options import EngineOptions

    loaded = {}

    def get(name, device="cpu", **options):
        key = (name, device, tuple(sorted(options.items())))
        if key not in loaded:
            path = tiny_model if name == "tiny" else fixtures[name]
            loaded[key] = Engine.load(path, EngineOptions(device=device, **options))
        return loaded[key]

    return get


def _dequantized(engines, fmt, stored):
    """The tiny model with each quantized weight replaced by the float value its integers stand for."""
    import torch

    script = load_script("make_quantized_fixtures")
    method, bits = script.FORMATS[fmt]
    engine = engines("tiny")
    model = type(engine.model)(engine.model.config).eval()
    model.load_state_dict(engine.model.state_dict())
    for name, module in model.named_modules():
        if name.startswith("model.language_model.layers.") and name.endswith(script.QUANTIZED):
            weight = stored["model." + name[len("model.language_model."):] + ".weight"]
            with torch.no_grad():
                module.weight.copy_(script.fake_quantize(weight, method, bits, 64))
    return model


def _quantized_modules(model):
    return {n: m for n, m in model.named_modules() if type(m).__module__.startswith("gptqmodel")}


@pytest.mark.parametrize("fmt", FORMATS)
def test_vision_tower_stays_16bit(engines, fmt, tiny_model):
    """The published config form, loaded through qvl: no vision-tower module is a quantized
    layer, the tower holds the checkpoint's weights, and every decoder linear is quantized."""
    import torch
    from safetensors.torch import load_file

    model = engines(fmt).model
    quantized = _quantized_modules(model)
    assert not [n for n in quantized if n.startswith("model.visual")]
    assert len(quantized) == 14 and all(n.startswith("model.language_model.layers.") for n in quantized)
    stored = load_file(str(tiny_model / "model.safetensors"))
    qkv = model.model.visual.blocks[0].attn.qkv
    assert type(qkv) is torch.nn.Linear
    assert torch.equal(qkv.weight.detach(), stored["visual.blocks.0.attn.qkv.weight"].half().float())


@pytest.fixture(scope="module")
def wide_awq(tmp_path_factory):
    """An AWQ fixture whose vision tower is 128 wide (the tiny one is 32, less than the group
    size), so that wrapping the tower does not fail at once, as at full size (1280)."""

    maker = load_script("make_tiny_model")
    maker.VISION = dict(maker.VISION, embed_dim=128)  # this module object only
    root = tmp_path_factory.mktemp("wide")
    return load_script("make_quantized_fixtures").write_fixture(maker.make_tiny_model(root / "tiny"), root / "awq", "awq")


def test_published_awq_form_without_normalisation_breaks_the_vision_tower(wide_awq):
    """Why quant.normalise exists: transformers 5.23 reads ["visual"] as not matching
    model.visual, so it builds AWQ layers for the vision tower, and since the checkpoint
    stores the tower unquantized they load without an error and stay uninitialised.
    If this fails, transformers has fixed it and the normalisation is no longer needed."""
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from qwenvl_cli.engine.engine import Engine

    from qwenvl_cli.engine.options import EngineOptions

    config = AutoConfig.from_pretrained(wide_awq)
    config.quantization_config = dict(config.quantization_config, backend="torch_awq")
    assert config.quantization_config["modules_to_not_convert"] == ["visual"]
    raw, info = Qwen2VLForConditionalGeneration.from_pretrained(
        wide_awq, config=config, dtype=torch.float32, output_loading_info=True)
    assert type(raw.model.visual.blocks[0].attn.qkv).__module__.startswith("gptqmodel")
    assert "model.visual.blocks.0.attn.qkv.qweight" in info["missing_keys"]  # never written
    fixed = Engine.load(wide_awq, EngineOptions(device="cpu")).model.model.visual.blocks[0].attn.qkv
    assert type(fixed) is torch.nn.Linear and torch.isfinite(fixed.weight).all()


@pytest.mark.parametrize("fmt, bound", [("awq", 0.45), ("gptq-int4", 0.45), ("gptq-int8", 0.04)])
def test_logits_close_to_the_unquantized_model(engines, fmt, bound, image, tiny_model):
    from safetensors.torch import load_file

    _messages, inputs = _inputs(engines("tiny"), image)
    assert int((inputs["image_grid_thw"]).prod()) > 0
    quantized = _logits(engines(fmt), inputs)
    reference = _logits(engines("tiny"), inputs)
    dequantized = _dequantized(engines, fmt, load_file(str(tiny_model / "model.safetensors")))
    import torch

    with torch.inference_mode():
        exact = dequantized(**inputs).logits[0].float()
    assert _rel(quantized, exact) <= 0.01  # the kernels read the packed format right
    assert 0.001 < _rel(quantized, reference) <= bound  # close, and not the same model
    agree = float((quantized.argmax(-1) == reference.argmax(-1)).float().mean())
    assert agree >= (0.95 if fmt == "gptq-int8" else 0.5)


def test_a_packing_mistake_breaks_the_tight_bound(fixtures, engines, image, tmp_path):
    """The dequantized comparison can fail: GPTQ Int8 zeros stored as is, not minus one (the
    smallest mistake of those tried, one quantization step per weight) is 0.06 away."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from qwenvl_cli.engine.engine import Engine

    from qwenvl_cli.engine.options import EngineOptions

    script = load_script("make_quantized_fixtures")
    bad = shutil.copytree(fixtures["gptq-int8"], tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        tensors[name] = script.pack_columns(script.unpack_columns(tensors[name], 8) + 1, 8)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _messages, inputs = _inputs(engines("tiny"), image)
    good = _logits(engines("gptq-int8"), inputs)
    wrong = _logits(Engine.load(bad, EngineOptions(device="cpu")), inputs)
    assert _rel(wrong, good) > 0.02
    assert torch.isfinite(wrong).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_answers_an_image_prompt_on_cpu(engines, fmt, image):
    from qwenvl_cli.engine.engine import Prepared
    from qwenvl_cli.generation import GenerationParams

    engine = engines(fmt)
    messages, inputs = _inputs(engine, image)
    chunks = list(engine.stream(messages, GenerationParams(max_tokens=8, temperature=0),
                                prepared=Prepared(inputs, int(inputs["input_ids"].shape[-1]))))
    final = chunks[-1]
    assert final.finish_reason in ("stop", "length") and 1 <= final.usage.completion_tokens <= 8
    assert "".join(c.text or "" for c in chunks[:-1]).strip()
    assert engine.plan.device == "cpu" and engine.plan.dtype_name == "float32"
    assert any("gptqmodel's torch kernels" in n for n in engine.notes)
    assert engine.describe()["notes"] == list(engine.notes)


def test_cpu_load_uses_torch_kernels_without_compiling(engines):
    model = engines("gptq-int8").model
    layers = _quantized_modules(model).values()
    assert {type(m).__name__ for m in layers} == {"TorchLinear"}
    assert not any(hasattr(v, "_torchdynamo_orig_callable") for m in layers for v in vars(m).values())
    assert {type(m).__name__ for m in _quantized_modules(engines("awq").model).values()} == {"AwqTorchLinear"}


@pytest.mark.gpu
@needs_gpu
def test_awq_on_cuda_runs_float16_and_says_so(engines, image):
    import torch

    engine = engines("awq", device="cuda", dtype="bfloat16")
    assert engine.plan.dtype_name == "float16"
    assert any("float16" in n and "bfloat16" in n for n in engine.notes)
    assert next(engine.model.model.visual.parameters()).dtype == torch.float16
    _messages, inputs = _inputs(engine, image)
    reference = _logits(engines("tiny"), inputs)
    assert _rel(_logits(engine, inputs), reference) <= 0.45


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt, bound", [("gptq-int4", 0.45), ("gptq-int8", 0.04)])
def test_gptq_on_cuda_is_close_to_the_unquantized_model(engines, fmt, bound, image):
    engine = engines(fmt, device="cuda", dtype="float16")
    assert not [n for n in _quantized_modules(engine.model) if n.startswith("model.visual")]
    _messages, inputs = _inputs(engine, image)
    assert _rel(_logits(engine, inputs), _logits(engines("tiny"), inputs)) <= bound


@pytest.mark.parametrize("fmt", ["awq", "gptq-int4", "gptq-int8"])
def test_qvl_chat_answers_with_a_quantized_checkpoint_and_only_the_answer_on_stdout(fixtures, image, fmt):
    """The acceptance command, as a real process. gptqmodel prints a banner and logs on stdout
    when imported; the engine keeps them off it, so stdout holds the answer alone."""

    done = run_qvl("chat", "--model-path", str(fixtures[fmt]), "--image", str(image), "--max-tokens", "4",
                   "--temperature", "0", "hi", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.endswith("\n") and done.stdout.count("\n") == 1, done.stdout
    assert "gptqmodel" not in done.stdout.lower() and "Traceback" not in done.stderr
