"""Does a spec fit the GPUs? And which spec to take for ``--size-in-billions auto``.

``check_fit`` is what ``launch`` and ``download`` call before fetching anything;
``choose`` picks the largest size (then the least quantized format) that fits. Both take
the GPU report as an argument, so tests simulate GPUs and ``resolve`` stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from qwenvl_cli import settings
from qwenvl_cli.catalogue.load import load_catalogue
from qwenvl_cli.catalogue.resolve import SpecQuery, resolve
from qwenvl_cli.catalogue.spec import (
    NO_QUANTIZATION,
    Catalogue,
    Family,
    ResolvedSpec,
    parse_size,
    size_display,
    size_number,
)
from qwenvl_cli.errors import DoesNotFit, NoEstimate, UsageError
from qwenvl_cli.fit import gpus as gpus_mod
from qwenvl_cli.fit import memory
from qwenvl_cli.fit.gpus import Gpu, GpuReport, gib
from qwenvl_cli.fit.memory import Estimate, Workload

AUTO = "auto"
MIN_SUGGESTED_CONTEXT = 4096


@dataclass(frozen=True)
class Placement:
    gpus: tuple[Gpu, ...]  # the GPUs that would hold the model, in placement order
    shares: tuple[int, ...]  # bytes on each


@dataclass(frozen=True)
class Choice:
    """The outcome of ``--size-in-billions auto``."""

    size_in_billions: str
    model_format: str
    quantization: str
    estimate: Estimate | None
    reason: str


@dataclass(frozen=True)
class FitResult:
    spec: ResolvedSpec
    report: GpuReport
    estimate: Estimate | None
    fits: bool | None  # None: not known (no figures, or no GPU memory to compare with)
    placement: Placement | None
    reason: str  # one line, for the user
    suggestion: str | None = None  # what would fit instead, when it does not
    choice: Choice | None = None  # set when the size was chosen by `auto`

    def require(self, force: bool = False) -> None:
        """Raise DoesNotFit when the estimate says no, unless ``force``."""
        if self.fits is False and not force:
            hint = f"try {self.suggestion}, or pass --force" if self.suggestion else None
            raise DoesNotFit(self.reason, hint or "pass --force to try anyway")

    @property
    def verdict(self) -> str:
        """'yes, on GPU 0 (...)' / 'no: ... ; try ...' / 'not checked: ...'."""
        if self.fits:
            shares = self.placement.shares
            split = "" if len(shares) == 1 else " (" + " + ".join(gib(s) for s in shares) + " GiB)"
            return f"yes, on {_where(self.placement.gpus)}{split}"
        if self.fits is None:
            return "not checked: " + self.reason.split("not checked: ", 1)[-1]
        return f"no: {self.reason}" + (f"; try {self.suggestion}" if self.suggestion else "")

    def rows(self) -> list[tuple[str, str]]:
        """Lines for `qvl resolve`: the estimate, the GPUs, the verdict."""
        memory_line = self.estimate.describe() if self.estimate else "unknown"
        return [("memory", memory_line), ("GPUs", self.report.describe()), ("fits", self.verdict)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory": self.estimate.to_dict() if self.estimate else None,
            "gpus": self.report.to_dict(),
            "fit": {"fits": self.fits, "reason": self.reason, "suggestion": self.suggestion,
                    "gpus": [g.index for g in self.placement.gpus] if self.placement else [],
                    "per_gpu_bytes": list(self.placement.shares) if self.placement else []},
            "auto": None if self.choice is None else {
                "size_in_billions": size_display(self.choice.size_in_billions),
                "model_format": self.choice.model_format,
                "quantization": self.choice.quantization, "reason": self.choice.reason},
        }


# --- placement ------------------------------------------------------------------------


def place(est: Estimate, gpus: tuple[Gpu, ...]) -> Placement | None:
    """The fewest GPUs (freest first) whose free memory holds the even split, or None.

    Raises ValueError when a GPU's free memory is unknown.
    """
    if any(g.free is None for g in gpus):
        raise ValueError("free memory unknown")
    ordered = tuple(sorted(gpus, key=lambda g: -g.free))
    for n in range(1, len(ordered) + 1):
        if not est.splits_into(n):
            continue
        shares = est.per_gpu(n)
        if all(s <= g.free for s, g in zip(shares, ordered)):
            return Placement(ordered[:len(shares)], shares)
    return None


def _where(gpus: tuple[Gpu, ...]) -> str:
    if len(gpus) == 1:
        return gpus[0].label()
    return "GPUs " + ",".join(str(g.index) for g in gpus)


def _free(gpus: tuple[Gpu, ...]) -> str:
    if len(gpus) == 1:
        return f"{gpus[0].label()} has {gib(gpus[0].free)} GiB free"
    frees = " + ".join(gib(g.free) for g in gpus)
    return f"GPUs {','.join(str(g.index) for g in gpus)} have {frees} GiB free"


def _short(spec: ResolvedSpec | tuple[str, str, str]) -> str:
    size, fmt, quant = ((spec.size_in_billions, spec.model_format, spec.quantization)
                        if isinstance(spec, ResolvedSpec) else spec)
    return f"{size_display(size)}B {fmt}" + ("" if quant == NO_QUANTIZATION else f" {quant}")


# --- the fit check --------------------------------------------------------------------


def check_fit(spec: ResolvedSpec, report: GpuReport, workload: Workload = Workload()) -> FitResult:
    """Compare the estimate of ``spec`` with the free memory of the selected GPUs."""
    try:
        est = memory.estimate(spec, workload)
    except NoEstimate as exc:
        return FitResult(spec, report, None, None, None, f"not checked: {exc.message}")
    needs = f"{_short(spec)} needs ~{gib(est.total)} GiB at {est.context_length:,} tokens of context"
    if not report.gpus:
        why = "no GPU visible" if report.known else "GPU memory unknown"
        return FitResult(spec, report, est, None, None, f"{needs}; not checked: {why}")
    try:
        placement = place(est, report.gpus)
    except ValueError:
        return FitResult(spec, report, est, None, None, f"{needs}; not checked: free memory unknown")
    if placement is not None:
        return FitResult(spec, report, est, True, placement,
                         f"{needs}: fits on {_where(placement.gpus)}")
    return FitResult(spec, report, est, False, None, f"{needs}, {_free(report.gpus)}",
                     suggestion=suggest(spec, report, workload))


def suggest(spec: ResolvedSpec, report: GpuReport, workload: Workload) -> str | None:
    """What would fit instead: another spec, a shorter context, or more GPUs (best first)."""
    options = []
    alt = _best_fitting(spec.family, report.gpus, workload, max_size=spec.size_in_billions)
    if alt is not None:
        (size, fmt, quant), est = alt
        options.append(f"`{_flags(spec, size, fmt, quant)}` (~{gib(est.total)} GiB)")
    ctx = max_context(spec.family, _key(spec), report.gpus, workload)
    if ctx is not None:
        options.append(f"`--context-length {ctx}`")
    more = _more_gpus(spec, report, workload)
    if more is not None:
        options.append(f"`--gpu-idx {more}`")
    if not options:
        return None
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def _candidates(family: Family, model_format: str | None = None, quantization: str | None = None
                ) -> list[tuple[str, str, str]]:
    out = []
    for entry in family.specs:
        if model_format and entry.model_format.lower() != model_format.strip().lower():
            continue
        for quant in entry.quantizations:
            if quantization and quant.lower() != quantization.strip().lower():
                continue
            out.append((entry.size_in_billions, entry.model_format, quant))
    return out


def _estimate(family: Family, key: tuple[str, str, str], workload: Workload) -> Estimate | None:
    size, fmt, quant = key
    dims = family.dims(size)
    try:
        bits = memory.quant_bits(quant)
    except ValueError:
        return None
    if dims is None:
        return None
    context = workload.context_length or family.context_length
    return memory.compute(dims, f"{family.name} {_short(key)}", fmt, bits, context, workload)


def _bits(quantization: str) -> int:
    """Bits per decoder weight: 16 unquantized, 0 when the name says nothing."""
    try:
        return memory.quant_bits(quantization) or 16
    except ValueError:
        return 0


def _rank(key: tuple[str, str, str], est: Estimate) -> tuple:
    """Largest size first, then the least quantized, then the smallest estimate."""
    return (-size_number(key[0]), -_bits(key[2]), est.total)


def _best_fitting(family: Family, gpus: tuple[Gpu, ...], workload: Workload,
                  max_size: str | None = None, model_format: str | None = None,
                  quantization: str | None = None) -> tuple[tuple[str, str, str], Estimate] | None:
    fitting = []
    for key in _candidates(family, model_format, quantization):
        if max_size is not None and size_number(key[0]) > size_number(max_size):
            continue
        est = _estimate(family, key, workload)
        if est is not None and gpus and _fits(est, gpus):
            fitting.append((key, est))
    return min(fitting, key=lambda pair: _rank(*pair), default=None)


def _fits(est: Estimate, gpus: tuple[Gpu, ...]) -> bool:
    try:
        return place(est, gpus) is not None
    except ValueError:
        return False


def _key(spec: ResolvedSpec) -> tuple[str, str, str]:
    return spec.size_in_billions, spec.model_format, spec.quantization


def _flags(spec: ResolvedSpec, size: str, fmt: str, quant: str) -> str:
    """The flags that turn ``spec`` into (size, fmt, quant), e.g. '-f gptq -q Int8'."""
    flags = []
    if size != spec.size_in_billions:
        flags.append(f"-s {size_display(size)}")
    if fmt != spec.model_format:
        flags.append(f"-f {fmt}")
    several = len([k for k in _candidates(spec.family, fmt) if k[0] == size]) > 1
    typed_q = "quantization" not in spec.defaulted  # then the user's -q must be replaced
    if several or (quant != spec.quantization and typed_q):
        flags.append(f"-q {quant}")
    return " ".join(flags)


def max_context(family: Family, key: tuple[str, str, str], gpus: tuple[Gpu, ...],
                workload: Workload) -> int | None:
    """The longest context (a multiple of 1024, at least 4096) that fits, if shorter than asked."""
    asked = workload.context_length or family.context_length
    if _estimate(family, key, workload) is None or not gpus:
        return None

    def fits(ctx: int) -> bool:
        return _fits(_estimate(family, key, replace(workload, context_length=ctx)), gpus)

    low, high = MIN_SUGGESTED_CONTEXT // 1024, (asked - 1) // 1024
    if high < low or not fits(low * 1024):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid * 1024) else (low, mid - 1)
    return low * 1024


def _more_gpus(spec: ResolvedSpec, report: GpuReport, workload: Workload) -> str | None:
    others = tuple(g for g in report.visible if g not in report.gpus)
    if not others:
        return None
    try:
        placement = place(memory.estimate(spec, workload), report.visible)
    except (ValueError, NoEstimate):
        return None
    if placement is None:
        return None
    return ",".join(str(i) for i in sorted(g.index for g in placement.gpus))


# --- auto -----------------------------------------------------------------------------


def choose(family: Family, report: GpuReport, workload: Workload = Workload(),
           model_format: str | None = None, quantization: str | None = None) -> Choice:
    """``--size-in-billions auto``: the largest size, then the least quantized format, that fits."""
    candidates = _candidates(family, model_format, quantization)
    if not candidates:
        what = " ".join(x for x in (model_format, quantization) if x)
        raise UsageError(f"no {family.name} spec is {what}", "check -f / -q with `qvl list-specs`")
    if not report.gpus:
        return _choose_cpu(family, report, candidates)
    gpus = tuple(replace(g, free=g.total) if g.free is None else g for g in report.gpus)
    if any(g.free is None for g in gpus):
        raise UsageError("cannot choose a size automatically: the GPUs' memory is unknown",
                         "pick one with --size-in-billions (-s)")
    estimates = {k: e for k in candidates if (e := _estimate(family, k, workload)) is not None}
    if not estimates:
        raise UsageError(f"cannot choose a size automatically: {family.source_file} gives no "
                         "architecture figures (`sizes:`)", "pick one with --size-in-billions (-s)")
    best = _best_fitting(family, gpus, workload, model_format=model_format, quantization=quantization)
    if best is None:
        key, est = min(estimates.items(), key=lambda kv: kv[1].total)
        raise DoesNotFit(f"no {family.name} spec fits: the smallest, {_short(key)}, needs "
                         f"~{gib(est.total)} GiB at {est.context_length:,} tokens of context, {_free(gpus)}",
                         "free GPU memory, lower --context-length or --max-pixels, or pick a spec "
                         "with -s and pass --force")
    key, est = best
    return Choice(*key, est, _reason(key, est, gpus, estimates, family, workload))


def _choose_cpu(family: Family, report: GpuReport, candidates: list[tuple[str, str, str]]) -> Choice:
    """No GPU to measure: the smallest size, unquantized (AWQ/GPTQ kernels need CUDA)."""
    key = min(candidates, key=lambda k: (size_number(k[0]), -_bits(k[2])))
    why = ("no GPU is visible" if report.known
           else "no GPU could be probed (" + "; ".join(report.notes) + ")")
    return Choice(*key, None, f"auto: {why}, so picked {_short(key)}, the smallest spec, to run on "
                              "the CPU; choose another with --size-in-billions")


def _reason(key, est: Estimate, gpus, estimates: dict, family: Family, workload: Workload) -> str:
    used = place(est, gpus).gpus
    where = _where(used) if len(used) > 1 else f"{used[0].label()}, {gib(used[0].free)} GiB free"
    text = (f"auto: picked {_short(key)} (~{gib(est.total)} GiB at {est.context_length:,} tokens of "
            f"context), the largest size, least quantized, that fits {where}")
    bigger = [(k, e) for k, e in estimates.items() if size_number(k[0]) > size_number(key[0])]
    if bigger:
        k, e = min(bigger, key=lambda kv: (size_number(kv[0][0]), kv[1].total))
        text += f"; {_short(k)} would need ~{gib(e.total)} GiB"
        ctx = max_context(family, k, gpus, workload)
        if ctx is not None:
            text += f" (it fits with --context-length {ctx})"
    return text


# --- flags -> spec + fit --------------------------------------------------------------


def resolve_and_check(query: SpecQuery = SpecQuery(), gpu_idx: str | None = None,
                      workload: Workload = Workload(), catalogue: Catalogue | None = None,
                      report: GpuReport | None = None) -> FitResult:
    """The spec flags (``-s auto`` included) -> the spec and its fit on the selected GPUs.

    ``launch`` and ``download`` then call ``result.require(force)`` before fetching.
    """
    catalogue = catalogue if catalogue is not None else load_catalogue()
    report = report if report is not None else gpus_mod.query(gpu_idx)
    if query.model_engine == "vllm":  # vLLM splits every layer over the GPUs (tensor parallel)
        workload = replace(workload, tensor_parallel=True)
    choice = None
    if query.size_in_billions is not None and str(query.size_in_billions).strip().lower() == AUTO:
        family = catalogue.family(query.model_name or settings.DEFAULT_MODEL_NAME)
        choice = choose(family, report, workload, query.model_format, query.quantization)
        query = replace(query, size_in_billions=choice.size_in_billions, model_format=choice.model_format,
                        quantization=choice.quantization)
    spec = resolve(query, catalogue)
    return replace(check_fit(spec, report, workload), choice=choice)


def annotate_rows(catalogue: Catalogue, rows: list[dict[str, Any]], report: GpuReport,
                  workload: Workload = Workload()) -> list[dict[str, Any]]:
    """`list-specs --fit`: each row with ``memory_bytes`` and ``fits`` (true, false or null)."""
    out = []
    for row in rows:
        family = catalogue.family(row["model_name"])
        key = (parse_size(row["size_in_billions"]), row["model_format"], row["quantization"])
        est = _estimate(family, key, workload)
        fits = None
        if est is not None and report.gpus and all(g.free is not None for g in report.gpus):
            fits = place(est, report.gpus) is not None
        out.append({**row, "memory_bytes": est.total if est else None, "fits": fits})
    return out
