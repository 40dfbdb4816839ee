"""Fixtures for the download and cache tests: generated repos and a loopback hub serving
them under the catalogue's names (Qwen/Qwen2-VL-2B-Instruct at the pinned commit on
Hugging Face, qwen/Qwen2-VL-2B-Instruct at master on ModelScope).

Test modules import the fixtures they use: ``from hubfixtures import server, model_repo``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import qvl_env
from hubserver import HubServer, make_repo

HF_ID = "Qwen/Qwen2-VL-2B-Instruct"
MS_ID = "qwen/Qwen2-VL-2B-Instruct"
PIN = "096da3b96240e3d66d35be0e5ccbe282eea8d6b1"  # the catalogue's Hugging Face revision for 2B
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
NEEDED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "vocab.json", "merges.txt", "preprocessor_config.json", "chat_template.json",
          SHARD1, SHARD2, "model.safetensors.index.json"}
MIB = 1024 * 1024
HF_CHUNK = 10 * MIB  # huggingface_hub writes a download to disk in chunks of this size


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    """A checkpoint-like repo: ~1.5 MB of weights in two shards, plus files to skip."""
    return make_repo(tmp_path_factory.mktemp("repos") / "small")


@pytest.fixture(scope="session")
def big_repo(tmp_path_factory) -> Path:
    """Shards of 11 MiB: more than one huggingface_hub chunk, so a cut leaves bytes to resume."""
    return make_repo(tmp_path_factory.mktemp("repos") / "big", weight_bytes=22 * MIB, seed=1)


def _serve(monkeypatch, folder: Path) -> HubServer:
    server = HubServer().start()
    server.add_repo(folder, hf_id=HF_ID, ms_id=MS_ID, hf_commit=PIN)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
    monkeypatch.setenv("QVL_RETRY_BACKOFF", "0.01")
    monkeypatch.setenv("QVL_HUB_TIMEOUT", "2")
    monkeypatch.setenv("QVL_PROGRESS_INTERVAL", "0")
    return server


@pytest.fixture
def server(monkeypatch, model_repo):
    """The loopback hub serving the small repo; HF_ENDPOINT and MODELSCOPE_ENDPOINT point at it."""
    hub = _serve(monkeypatch, model_repo)
    yield hub
    hub.stop()


@pytest.fixture
def big_server(monkeypatch, big_repo):
    hub = _serve(monkeypatch, big_repo)
    yield hub
    hub.stop()


def spawn_qvl(*args: str, stderr_path: Path) -> subprocess.Popen:
    """Start `qvl ARGS` in the background, stderr into a file (read it while it runs)."""
    return subprocess.Popen([sys.executable, "-m", "qwenvl_cli", *args], env=qvl_env(),
                            stdout=subprocess.PIPE, stderr=stderr_path.open("w"), text=True)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def same_bytes(folder: Path, source: Path, names=NEEDED) -> bool:
    return all((folder / n).read_bytes() == (source / n).read_bytes() for n in names)
