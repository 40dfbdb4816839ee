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
# The short names the tables print (list-specs, cached), accepted wherever a hub is named.
HUB_ALIASES = {"hf": "huggingface", "ms": "modelscope"}

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
    """The ModelScope cache root as modelscope_hub resolves it (``MODELSCOPE_CACHE``, default
    ``~/.cache/modelscope``; models live under ``models/{owner}--{name}/snapshots/{revision}``).
    Older SDKs (< 1.38) kept ``~/.cache/modelscope/hub/models/{owner}/{name}``; qvl reads
    that layout too (see layout.py)."""
    return _env_path("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope"


def locks_dir() -> Path:
    """Where qvl keeps the per-model download locks."""
    return qvl_home() / "locks"


def hf_endpoint() -> str:
    """``HF_ENDPOINT`` (a mirror) or the Hugging Face Hub, read at call time.

    huggingface_hub reads HF_ENDPOINT once at import; qvl passes this value explicitly."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").strip().rstrip("/")


def modelscope_endpoint() -> str:
    """``MODELSCOPE_ENDPOINT`` (or the deprecated ``MODELSCOPE_DOMAIN``) or modelscope.cn."""
    value = (os.environ.get("MODELSCOPE_ENDPOINT") or "").strip()
    if not value:
        value = (os.environ.get("MODELSCOPE_DOMAIN") or "").strip()
        if value and not value.startswith(("http://", "https://")):
            value = "https://" + value
    return (value or "https://www.modelscope.cn").rstrip("/")


def _env_number(name: str, default: float, kind: type = float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        from qwenvl_cli.errors import UsageError

        raise UsageError(f"{name}={raw!r} is not a number", f"unset {name} or give it a number") from None
    return value


def free_bytes_override() -> int | None:
    """``QVL_TEST_FREE_BYTES``: pretend the cache disk has this many bytes free (tests)."""
    return int(_env_number("QVL_TEST_FREE_BYTES", -1, int)) if os.environ.get("QVL_TEST_FREE_BYTES") else None


def download_workers() -> int:
    """Files fetched at the same time (``QVL_DOWNLOAD_WORKERS``, default 4)."""
    return max(1, int(_env_number("QVL_DOWNLOAD_WORKERS", 4, int)))


def download_attempts() -> int:
    """Attempts per file for transient failures, on top of the hub client's own retries."""
    return max(1, int(_env_number("QVL_DOWNLOAD_ATTEMPTS", 3, int)))


def retry_backoff() -> float:
    """Seconds before the first retry; doubled on each further one (``QVL_RETRY_BACKOFF``)."""
    return max(0.0, _env_number("QVL_RETRY_BACKOFF", 2.0))


def hub_timeout() -> float:
    """Seconds to wait for a hub to answer before calling it unreachable (``QVL_HUB_TIMEOUT``)."""
    return max(0.1, _env_number("QVL_HUB_TIMEOUT", 5.0))


def progress_interval() -> float:
    """Seconds between plain progress lines when stderr is not a terminal."""
    return max(0.0, _env_number("QVL_PROGRESS_INTERVAL", 5.0))


def download_hub() -> str:
    """``QVL_DOWNLOAD_HUB`` or ``auto``."""
    return (os.environ.get("QVL_DOWNLOAD_HUB") or "auto").strip().lower()


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def debug() -> bool:
    return os.environ.get("QVL_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def api_key() -> str | None:
    return os.environ.get("QVL_API_KEY") or None

