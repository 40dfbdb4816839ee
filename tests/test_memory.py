"""The memory estimator against the published measurements and the reference figures."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import qvl_env

from qwenvl_cli.fit import memory
from qwenvl_cli.catalogue.load import builtin_specs_dir
from qwenvl_cli.catalogue.resolve import resolve
from qwenvl_cli.errors import NoEstimate
from qwenvl_cli.fit.memory import GiB, Workload

# Qwen team, transformers on one A100 80GB, batch 1, generating 2048 tokens from an input of
# length 1 (text only). Their "GB" are GiB (torch's figure): in 10^9 bytes the 7B bf16 figure
# would be smaller than its weights (16.58e9 bytes).
PUBLISHED = [
    ("7", "pytorch", None, 16.07),
    ("7", "awq", None, 7.07),
    ("72", "awq", None, 41.98),
    ("2", "pytorch", None, 4.7),
]
PUBLISHED_RUN = Workload(context_length=1 + 2048, prompt_tokens=1, images=0)


def _spec(size, fmt, quant=None):
    return resolve(size_in_billions=size, model_format=fmt, quantization=quant)


@pytest.mark.parametrize("size,fmt,quant,published", PUBLISHED)
def test_published_measurements_within_ten_percent(size, fmt, quant, published):
    est = memory.estimate(_spec(size, fmt, quant), PUBLISHED_RUN)
    assert est.context_length == 2049 and est.prompt_tokens == 1 and est.visual_tokens == 0
    error = est.total / GiB / published - 1
    assert abs(error) < 0.10, f"{size}B {fmt}: {est.total / GiB:.2f} GiB vs {published} ({error:+.1%})"


@pytest.mark.parametrize("size,fmt,quant,reference_gb", [
    ("2", "pytorch", None, 4.42), ("7", "pytorch", None, 16.58), ("72", "pytorch", None, 146.8),
    ("2", "awq", None, 2.5), ("7", "awq", None, 6.9), ("72", "awq", None, 42.9),
    ("2", "gptq", "Int8", 3.1), ("7", "gptq", "Int8", 10.2), ("72", "gptq", "Int8", 78.2),
])
def test_weight_bytes_match_the_reference_sizes(size, fmt, quant, reference_gb):
    est = memory.estimate(_spec(size, fmt, quant))
    assert est.weights / 1e9 == pytest.approx(reference_gb, rel=0.02)


def test_unquantized_weights_are_two_bytes_per_parameter_and_awq_runs_in_fp16():
    spec = _spec("7", "pytorch")
    est = memory.estimate(spec)
    assert est.weights == 2 * spec.parameters and est.dtype == "bfloat16"
    assert memory.estimate(_spec("7", "awq")).dtype == "float16"
    # GPTQ carries a group index per input feature that AWQ does not
    awq, gptq = memory.estimate(_spec("7", "awq")), memory.estimate(_spec("7", "gptq", "Int4"))
    assert 0 < gptq.weights - awq.weights < 10 * 2 ** 20


@pytest.mark.parametrize("size,kib", [("2", 28), ("7", 56), ("72", 320)])
def test_kv_cache_scales_with_the_context(size, kib):
    spec = _spec(size, "pytorch")
    assert memory.estimate(spec).kv_cache == 32768 * kib * 1024  # the family's context by default
    assert memory.estimate(spec, Workload(context_length=4096)).kv_cache == 4096 * kib * 1024


def test_visual_tokens_from_the_pixel_budget_and_frames():
    dims = _spec("7", "pytorch").dims
    assert memory.visual_tokens(dims, Workload()) == 1280
    assert memory.visual_tokens(dims, Workload(max_pixels=16384 * 28 * 28)) == 16384
    assert memory.visual_tokens(dims, Workload(images=3)) == 3 * 1280
    assert memory.visual_tokens(dims, Workload(images=0, frames=16)) == 8 * 768
    assert memory.visual_tokens(dims, Workload(images=0, frames=15)) == 8 * 768  # padded to pairs
    assert memory.visual_tokens(dims, Workload(images=0, frames=768)) == 24576  # the video cap
    assert memory.visual_tokens(dims, Workload(images=0, frames=8, max_pixels=256 * 784)) == 4 * 256


def test_activations_grow_with_the_pixel_budget():
    spec = _spec("7", "pytorch")
    small = memory.estimate(spec, Workload(context_length=20000))
    large = memory.estimate(spec, Workload(context_length=20000, max_pixels=16384 * 28 * 28))
    assert large.prompt_tokens == 16384 + memory.TEXT_TOKENS
    assert 2.5 * GiB < large.activations - small.activations < 6 * GiB
    assert large.weights == small.weights and large.kv_cache == small.kv_cache


def test_prompt_length_is_capped_by_the_context_and_covers_the_visual_tokens():
    spec = _spec("2", "pytorch")
    assert memory.estimate(spec, Workload(prompt_tokens=100)).prompt_tokens == 1280
    assert memory.estimate(spec, Workload(context_length=1000)).prompt_tokens == 1000


def test_split_over_gpus_spreads_layers_and_keeps_the_total():
    est = memory.estimate(_spec("72", "pytorch"))
    assert est.per_gpu(1) == (est.total,)
    two = est.per_gpu(2)
    assert len(two) == 2 and all(share < est.total * 0.56 for share in two)
    # each extra GPU carries its own CUDA context (and the prefill activations)
    assert est.total < sum(two) < est.total + 2 * memory.CUDA_CONTEXT_BYTES + est.transient_bytes * 1.1
    assert two[0] > two[1]  # the first also holds the vision tower and the embeddings
    assert len(est.per_gpu(200)) == 80  # never more GPUs than layers


def test_breakdown_and_json():
    est = memory.estimate(_spec("7", "pytorch"))
    data = est.to_dict()
    assert data["total_bytes"] == est.weights + est.kv_cache + est.activations + est.overhead
    assert est.overhead > memory.CUDA_CONTEXT_BYTES
    assert est.describe() == (f"~{est.total / GiB:.1f} GiB (weights 15.4 + KV cache 1.8 at 32,768 tokens"
                              f" + activations {est.activations / GiB:.1f} + overhead 0.9)")


def test_quantization_names():
    assert memory.quant_bits("none") is None
    assert [memory.quant_bits(q) for q in ("Int4", "int8", "4-bit", "8bit")] == [4, 8, 4, 8]
    with pytest.raises(ValueError):
        memory.quant_bits("fp8-e4m3")


def test_no_estimate_without_figures(tmp_path, monkeypatch):
    text = (builtin_specs_dir() / "qwen2-vl-instruct.yaml").read_text().split("\nsizes:\n")[0]
    user = tmp_path / "qvl" / "specs"
    user.mkdir(parents=True)
    (user / "mine.yaml").write_text(text.replace("name: qwen2-vl-instruct", "name: mine"))
    monkeypatch.setenv("QVL_HOME", str(tmp_path / "qvl"))
    with pytest.raises(NoEstimate) as info:
        memory.estimate(resolve(model_name="mine", size_in_billions="7"))
    assert "gives no architecture figures" in info.value.message and "sizes:" in info.value.hint


def test_importing_the_estimator_stays_light():
    code = ("import sys, qwenvl_cli.fit.memory, qwenvl_cli.fit.check, qwenvl_cli.fit.gpus, qwenvl_cli.cli.app; "
            "heavy = {'torch', 'transformers', 'PIL', 'huggingface_hub', 'modelscope', 'pynvml'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=qvl_env())
    assert out.stdout.strip() == "[]"


def test_from_config_reads_a_published_style_config_like_the_catalogue():
    from dataclasses import asdict

    from qwenvl_cli.catalogue import dims as dims_mod

    spec = resolve(size_in_billions="7", hub="huggingface")
    cat = spec.dims
    config = {"hidden_size": cat.hidden_size, "intermediate_size": cat.intermediate_size,
              "num_hidden_layers": cat.num_hidden_layers, "num_attention_heads": cat.num_attention_heads,
              "num_key_value_heads": cat.num_key_value_heads, "vocab_size": cat.vocab_size,
              "tie_word_embeddings": cat.tie_word_embeddings,
              "vision_config": {"depth": cat.vision.depth, "embed_dim": cat.vision.embed_dim,
                                "num_heads": cat.vision.num_heads, "mlp_ratio": cat.vision.mlp_ratio,
                                "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                                "temporal_patch_size": 2, "hidden_size": cat.hidden_size}}
    assert asdict(dims_mod.from_config(config)) == asdict(cat)
    assert dims_mod.from_config({"hidden_size": 8}) is None


def test_prompt_bytes_grow_with_pixels_and_tokens():
    from qwenvl_cli.fit.memory import prompt_bytes

    d = resolve(size_in_billions="7", hub="huggingface").dims
    small = prompt_bytes(d, 1400, 1280, 512)
    big_image = prompt_bytes(d, 15700, 15552, 512)
    assert small < big_image
    assert prompt_bytes(d, 1400, 1280, 4096) - small == d.kv_bytes_per_token(2) * (4096 - 512)
    # a 12 MP photo at the checkpoint's own limit needs several GiB on top of the weights
    assert 2 * 2**30 < big_image < 20 * 2**30
