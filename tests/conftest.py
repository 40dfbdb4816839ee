"""Shared fixtures: every test runs with QVL_HOME and the hub caches in a temporary folder,
no hub endpoint, no token and no GPU assumptions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_CLEARED = ("HF_ENDPOINT", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN", "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN", "QVL_DOWNLOAD_HUB", "QVL_API_KEY", "HF_HUB_OFFLINE",
            "QVL_DEBUG", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """Point every directory qvl and the hub clients use into a fresh temporary folder."""
    return _point_home_at(monkeypatch, tmp_path_factory.mktemp("home"))


def _point_home_at(monkeypatch, root: Path) -> Path:
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(root))
    monkeypatch.setenv("QVL_HOME", str(root / "qvl"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(root / "modelscope"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return root


def qvl_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a qvl subprocess: the current one, with qvl importable."""
    import qwenvl_cli

    env = dict(os.environ)
    pkg_parent = str(Path(qwenvl_cli.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def run_qvl(*args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m qwenvl_cli ARGS` as a real process; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "qwenvl_cli", *args], env=qvl_env(env),
                          input=input, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture
def qvl():
    """`qvl("resolve", "-s", "7")` runs qvl in a subprocess."""
    return run_qvl


def load_script(name: str):
    """scripts/NAME.py imported by path (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_tiny_model(tmp_path_factory, name: str, **options) -> Path:
    # Session fixtures run before the autouse isolated_env; the build imports transformers and
    # huggingface_hub (which read HF_HOME etc. at import), so it gets a temporary home too.
    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _point_home_at(monkeypatch, root / "home")
        return load_script("make_tiny_model").make_tiny_model(root / "model", **options)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL-Instruct checkpoint (single model.safetensors), built once."""
    return _build_tiny_model(tmp_path_factory, "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny_model_sharded(tmp_path_factory) -> Path:
    """The same checkpoint (same seed, same weights) in 2 shards with model.safetensors.index.json."""
    return _build_tiny_model(tmp_path_factory, "tiny-qwen2-vl-sharded", shards=2)


@pytest.fixture(scope="session")
def tiny_model_hs32(tmp_path_factory) -> Path:
    """The tiny checkpoint with text attention head size 32, which vLLM's CPU attention accepts
    (it rejects 16); built once (tests/test_vllm*.py)."""
    return _build_tiny_model(tmp_path_factory, "tiny-qwen2-vl-hs32", head_size=32)


@pytest.fixture(scope="session")
def quantized_fixtures(tiny_model, tmp_path_factory) -> dict:
    """{"awq" | "gptq-int4" | "gptq-int8": folder}: the tiny checkpoint in the published AWQ /
    GPTQ formats (pure torch + safetensors, made once; loading them needs qvl[quant])."""
    return load_script("make_quantized_fixtures").make_quantized_fixtures(
        tiny_model, tmp_path_factory.mktemp("quantized"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly on machines without CUDA (torch is imported only when
    such tests were collected)."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in marked:
            item.add_marker(skip)
