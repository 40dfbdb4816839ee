"""Everything checked about a spec before anything is downloaded: resolution (``-s auto``
included), the AWQ / GPTQ packages, and the memory fit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwenvl_cli import render
from qwenvl_cli.catalogue.resolve import SpecQuery
from qwenvl_cli.fit import check, packages

if TYPE_CHECKING:
    from qwenvl_cli.fit.check import FitResult
    from qwenvl_cli.fit.memory import Workload


def check_spec(query: SpecQuery, *, gpu_idx: str | None = None, device: str = "auto",
               model_path: Any = None, force: bool = False, workload: Workload | None = None,
               need_backend: bool = True, quiet: bool = False, announce: bool = False) -> FitResult | None:
    """Resolve the spec flags, make sure the AWQ / GPTQ backend is installed (``need_backend``),
    refuse what will not fit the GPUs unless ``force``; ``announce`` prints the estimate next
    to the free memory. Returns the FitResult, or None for a --model-path given without spec
    flags (nothing to resolve)."""
    if model_path is not None and not query.given:
        return None
    kwargs = {"workload": workload} if workload is not None else {}
    result = check.resolve_and_check(query, gpu_idx=gpu_idx, **kwargs)
    if result.choice and result.choice.reason and not quiet:
        render.status(result.choice.reason)
    if model_path is None and need_backend:
        packages.require_backend(result.spec.model_format, device)
    if announce and not quiet and result.estimate is not None and result.fits is not None:
        render.status(f"{result.spec.label()}: needs {result.estimate.describe()}; "  # next to the free memory
                      f"GPUs: {result.report.describe()}; fits: {result.verdict}")
    if model_path is None:
        result.require(force)
    return result
