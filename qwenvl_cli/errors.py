"""One exception tree for qvl, and one table that turns known third-party errors into it.

Every expected failure is a :class:`QvlError` with a one-line ``message`` (what went wrong)
and a ``hint`` (what to do next). ``cli.main`` prints both and exits with ``exit_code``;
nothing else in qvl prints errors. Third-party exceptions are translated in one place,
:func:`translate`, by class name so that this module never imports the libraries.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from qwenvl_cli import install

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class QvlError(Exception):
    """An expected failure: one line for the user, one hint, an exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


# --- bad usage (exit 2) ---------------------------------------------------------------


class UsageError(QvlError):
    """The command line or a request asked for something that cannot be (exit 2)."""

    exit_code = EXIT_USAGE


class NoMatchingSpec(UsageError):
    """The spec flags match no spec, or match several."""


class MediaError(UsageError):
    """An image or video given by the user is missing, unreadable or out of bounds."""


class InvalidModelPath(UsageError):
    """``--model-path`` does not point at a usable model folder."""


class PromptTooLong(UsageError):
    """The rendered prompt is longer than the model's context length."""


class PromptTooLarge(UsageError):
    """The prompt's images or video need more GPU memory than is free."""


# --- other failures (exit 1) ----------------------------------------------------------


class CatalogueError(QvlError):
    """A spec YAML file is invalid; the message names the file, the spec and the key."""


class NoEstimate(CatalogueError):
    """The catalogue lacks the figures to estimate a spec's memory (no `sizes:` entry)."""


class DoesNotFit(QvlError):
    """The memory estimate exceeds the free GPU memory (exit 1; `--force` goes ahead anyway).

    Not a usage error: the same flags work on a machine with more free memory.
    """


class DownloadError(QvlError):
    """A model could not be fetched from a hub."""


class HubUnreachable(DownloadError):
    """The hub did not answer (connection refused, DNS, timeout)."""


class RepoNotFound(DownloadError):
    """The hub has no such repository or revision."""


class GatedRepo(DownloadError):
    """The repository needs credentials."""


class ChecksumMismatch(DownloadError):
    """A downloaded file does not match the size or hash the hub lists."""


class NotEnoughDisk(DownloadError):
    """The files still to fetch do not fit on the disk."""


class NotCached(DownloadError):
    """Offline mode and the model is not (completely) in the cache."""


class MissingDependency(QvlError):
    """An optional package needed for this spec or feature is not installed."""


class EngineError(QvlError):
    """The model could not be loaded or could not generate."""


class OutOfMemory(EngineError):
    """The device ran out of memory; the message carries the figures."""


class ServerError(QvlError):
    """A launched model could not be started, reached or stopped."""


# --- helpers --------------------------------------------------------------------------


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for a close match among ``choices``, else ''."""
    lowered = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]}?)" if close else ""


def one_line(text: object, limit: int = 300) -> str:
    """Collapse a third-party message to one line of bounded length."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _is_instance_named(exc: BaseException, names: set[str]) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def _missing_quant_backend(exc: BaseException) -> str | None:
    """'awq' / 'gptq' when transformers failed for want of gptqmodel or optimum.

    transformers 5.x says so with an ImportError naming the package, or (GPTQ without
    gptqmodel) `NameError: name 'QuantizeConfig' is not defined`, or (GPTQ on a machine
    without CUDA and without gptqmodel) `RuntimeError: GPU is required to ... quantize model`.
    """
    text = str(exc)
    if isinstance(exc, NameError) and "QuantizeConfig" in text:
        return "gptq"
    if isinstance(exc, RuntimeError) and "GPU is required to quantize" in text:
        return "gptq"
    if isinstance(exc, ImportError) and ("gptqmodel" in text or "optimum" in text):
        return "awq" if "AWQ" in text else "gptq"
    return None


def translate(exc: BaseException) -> QvlError | None:
    """Map a known third-party exception to a QvlError, or None when it is unknown.

    Matching is by class name along the MRO so that huggingface_hub, requests, PIL and
    torch need not be imported here.
    """
    if isinstance(exc, QvlError):
        return exc
    if _is_instance_named(exc, {"OutOfMemoryError"}):
        return OutOfMemory(
            f"out of GPU memory: {one_line(exc, 160)}",
            "use a quantized spec (-f awq), fewer pixels (--max-pixels), or more GPUs (--gpu-idx 0,1)",
        )
    if _is_instance_named(exc, {"GatedRepoError"}):
        return GatedRepo(
            "the repository is gated or private and needs a Hugging Face token",
            "run `hf auth login` or set HF_TOKEN",
        )
    if _is_instance_named(exc, {"RepositoryNotFoundError", "RevisionNotFoundError"}):
        return RepoNotFound(one_line(exc), "check the spec flags with `qvl resolve`")
    if _is_instance_named(exc, {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}):
        return NotCached(
            "the model is not in the local cache and offline mode is on",
            "download it first with `qvl download`, or unset HF_HUB_OFFLINE",
        )
    if _is_instance_named(exc, {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout"}):
        return HubUnreachable(one_line(exc), "check your network or set HF_ENDPOINT to a mirror")
    quant_backend = _missing_quant_backend(exc)
    if quant_backend:
        return MissingDependency(
            f"{quant_backend.upper()} checkpoints need packages that are not installed: "
            f"{install.quant_install_command(quant_backend)}", f"transformers said: {one_line(exc, 160)}")
    if _is_instance_named(exc, {"DecompressionBombError"}):
        return MediaError(one_line(exc), "pass a smaller image")
    if _is_instance_named(exc, {"UnidentifiedImageError"}):
        return MediaError(one_line(exc), "pass a PNG, JPEG, WebP, GIF or BMP image")
    return None
