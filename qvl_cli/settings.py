"""Environment and directories, read at call time (never cached at import).

Tests point ``QVL_HOME`` and the hub caches into a temporary folder; every function here
reads the environment when it is called so that they take effect.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "qwen2-vl-instruct"
DEFAULT_ENGINE = "transformers"
HUBS = ("huggingface", "modelscope")

# Image pixel budget defaults (what common servers use; the checkpoints' own defaults
# would turn a 12 MP photo into 15,552 visual tokens).
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 1280 * 28 * 28


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def qvl_home() -> Path:
    """``$QVL_HOME``, default ``~/.qvl``."""
    return _env_path("QVL_HOME") or Path.home() / ".qvl"


def user_specs_dir() -> Path:
    return qvl_home() / "specs"


def run_dir() -> Path:
    """Where launched models are registered."""
    return qvl_home() / "run"


def history_file() -> Path:
    return qvl_home() / "history"


def manifests_dir() -> Path:
    """Where qvl records what it verified after a complete download."""
    return qvl_home() / "manifests"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, resolved as huggingface_hub resolves it."""
    explicit = _env_path("HF_HUB_CACHE") or _env_path("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return explicit
    hf_home = _env_path("HF_HOME")
    if hf_home:
        return hf_home / "hub"
    xdg = _env_path("XDG_CACHE_HOME")
    return (xdg or Path.home() / ".cache") / "huggingface" / "hub"


def modelscope_cache() -> Path:
    """The ModelScope cache root (``MODELSCOPE_CACHE``, default ``~/.cache/modelscope/hub``)."""
    explicit = _env_path("MODELSCOPE_CACHE")
    if explicit:
        return explicit
    return Path.home() / ".cache" / "modelscope" / "hub"


def download_hub() -> str:
    """``QVL_DOWNLOAD_HUB`` or ``auto``."""
    return (os.environ.get("QVL_DOWNLOAD_HUB") or "auto").strip().lower()


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def debug() -> bool:
    return os.environ.get("QVL_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def api_key() -> str | None:
    return os.environ.get("QVL_API_KEY") or None
