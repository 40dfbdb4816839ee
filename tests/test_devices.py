"""Device, GPU, dtype and attention planning, with a stand-in for torch's CUDA view."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qwenvl_cli.engine import devices
from qwenvl_cli.fit import gpus
from qwenvl_cli.engine.options import EngineOptions
from qwenvl_cli.errors import EngineError, MissingDependency, UsageError


def fake_torch(n_gpus: int = 0, bf16: bool = True, free_gib: float = 70.0):
    cuda = SimpleNamespace(
        is_available=lambda: n_gpus > 0,
        device_count=lambda: n_gpus,
        is_bf16_supported=lambda: bf16,
        mem_get_info=lambda i: (int(free_gib * 2**30), int(80 * 2**30)),
    )
    return SimpleNamespace(cuda=cuda, bfloat16="bf16", float16="fp16", float32="fp32")


def test_cpu_machine_defaults_to_cpu_float32_sdpa():
    plan = devices.plan(fake_torch(0), EngineOptions())
    assert (plan.device, plan.gpus, plan.dtype_name, plan.attn) == ("cpu", (), "float32", "sdpa")
    assert plan.load_kwargs == {} and plan.describe() == "cpu"


def test_gpu_machine_defaults_to_gpu0_bfloat16_loaded_in_place():
    plan = devices.plan(fake_torch(2), EngineOptions())
    assert plan.device == "cuda:0" and plan.gpus == (0,)
    assert plan.dtype_name == "bfloat16" and plan.dtype == "bf16"
    assert plan.load_kwargs == {"device_map": {"": "cuda:0"}}


def test_older_gpu_gets_float16():
    assert devices.plan(fake_torch(1, bf16=False), EngineOptions()).dtype_name == "float16"


def test_awq_runs_in_float16_on_cuda_with_a_note_when_bf16_was_asked():
    plan = devices.plan(fake_torch(1), EngineOptions(model_format="awq", dtype="bfloat16"))
    assert plan.dtype_name == "float16"
    assert any("float16" in note for note in plan.notes)
    cpu = devices.plan(fake_torch(0), EngineOptions(model_format="awq"))
    assert cpu.dtype_name == "float32"


def test_several_gpus_spread_with_accelerate_and_max_memory():
    plan = devices.plan(fake_torch(4), EngineOptions(gpu_idx=(1, 3)))
    assert plan.gpus == (1, 3) and plan.device == "cuda:1"
    assert plan.load_kwargs["device_map"] == "auto"
    assert set(plan.max_memory) == {1, 3}  # only the chosen GPUs are used
    plan = devices.plan(fake_torch(4), EngineOptions(n_gpu=2, max_memory="0=20GiB,1=30GB"))
    assert plan.max_memory == {0: "20GiB", 1: "30GB"}
    plan = devices.plan(fake_torch(2), EngineOptions(n_gpu=2, max_memory="12"))
    assert plan.max_memory == {0: "12GiB", 1: "12GiB"}


@pytest.mark.parametrize("options,error,fragment", [
    (EngineOptions(gpu_idx=(3,)), UsageError, "GPU index 3 does not exist: this machine has 2 GPUs (0, 1)"),
    (EngineOptions(n_gpu=5), UsageError, "--n-gpu 5: this machine has 2 GPUs"),
    (EngineOptions(gpu_idx=(0, 1), n_gpu=1), UsageError, "does not match"),
    (EngineOptions(device="tpu"), UsageError, "unknown --device"),
    (EngineOptions(dtype="int3"), UsageError, "unknown --dtype"),
    (EngineOptions(attn="fast"), UsageError, "unknown --attn"),
    (EngineOptions(n_gpu=1, max_memory="7=3GiB"), UsageError, "not in use"),
    (EngineOptions(max_memory="lots"), UsageError, "not an amount"),
])
def test_bad_gpu_options_are_one_line_errors(options, error, fragment):
    with pytest.raises(error) as info:
        devices.plan(fake_torch(2), options)
    assert fragment in info.value.message
    assert info.value.hint


def test_cuda_asked_on_a_cpu_machine():
    with pytest.raises(EngineError, match="torch sees no CUDA GPU"):
        devices.plan(fake_torch(0), EngineOptions(device="cuda"))
    with pytest.raises(UsageError, match="torch sees no CUDA GPU"):
        devices.plan(fake_torch(0), EngineOptions(gpu_idx=(0,)))
    with pytest.raises(UsageError, match="cannot be used with --device cpu"):
        devices.plan(fake_torch(2), EngineOptions(device="cpu", n_gpu=1))


def test_flash_attention_rules(monkeypatch):
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        devices.plan(fake_torch(0), EngineOptions(attn="flash_attention_2"))
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependency, match="flash-attn"):
        devices.plan(fake_torch(1), EngineOptions(attn="flash_attention_2"))
    assert devices.plan(fake_torch(1), EngineOptions()).attn == "sdpa"
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: object())
    assert devices.plan(fake_torch(1), EngineOptions()).attn == "flash_attention_2"
    assert devices.plan(fake_torch(1), EngineOptions(dtype="float32")).attn == "sdpa"


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("0", (0,)), ("0, 2", (0, 2))])
def test_parse_gpu_idx(value, expected):
    assert gpus.parse_gpu_idx(value) == expected


@pytest.mark.parametrize("value", ["a", "0,0", "-1", "1,,2"])
def test_parse_gpu_idx_rejects(value):
    with pytest.raises(UsageError):
        gpus.parse_gpu_idx(value)
