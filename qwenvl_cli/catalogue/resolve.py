"""Spec flags -> one concrete spec: the SpecQuery record, resolution, the list-specs rows."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from qwenvl_cli import settings
from qwenvl_cli.catalogue.load import load_catalogue
from qwenvl_cli.catalogue.spec import (
    Catalogue,
    Family,
    HubSource,
    ResolvedSpec,
    parse_size,
    size_display,
    size_number,
    unique,
)
from qwenvl_cli.errors import NoMatchingSpec, did_you_mean

# --- resolution -----------------------------------------------------------------------


def _pick(value: str, choices: list[str], what: str, flag: str, context: str) -> str:
    for choice in choices:
        if choice.lower() == value.strip().lower():
            return choice
    raise NoMatchingSpec(
        f"no spec with {what} {value!r}{context}{did_you_mean(value, choices)}",
        f"valid values for {flag}: " + ", ".join(choices),
    )


@dataclass(frozen=True)
class SpecQuery:
    """The spec flags as the user gave them (None: not given), from the command line to
    resolution: ``--model-name``, ``--model-engine``, ``--size-in-billions``,
    ``--model-format``, ``--quantization`` and ``--download-hub``."""

    model_name: str | None = None
    model_engine: str | None = None
    size_in_billions: str | float | None = None
    model_format: str | None = None
    quantization: str | None = None
    hub: str | None = None

    @property
    def given(self) -> bool:
        """Whether any spec flag was given."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve(query: SpecQuery | None = None, catalogue: Catalogue | None = None, **flags: Any) -> ResolvedSpec:
    """Turn the spec flags (a SpecQuery, or its fields as keywords) into exactly one concrete
    spec, or raise NoMatchingSpec."""
    query = query if query is not None else SpecQuery(**flags)
    model_name, model_engine, size_in_billions = query.model_name, query.model_engine, query.size_in_billions
    model_format, quantization, hub = query.model_format, query.quantization, query.hub
    catalogue = catalogue if catalogue is not None else load_catalogue()
    defaulted: list[str] = []
    if model_name is None:
        model_name, _ = settings.DEFAULT_MODEL_NAME, defaulted.append("model_name")
    fam = catalogue.family(model_name)
    if model_engine is None:
        model_engine, _ = fam.engines[0], defaulted.append("model_engine")
    engine = _pick(model_engine, list(fam.engines), "engine", "--model-engine", "")
    specs = list(fam.specs)

    formats = unique(s.model_format for s in specs)
    if model_format is None:
        model_format = "pytorch" if "pytorch" in formats else formats[0]
        defaulted.append("model_format")
    fmt = _pick(model_format, formats, "format", "--model-format", "")
    specs = [s for s in specs if s.model_format == fmt]

    sizes = sorted(unique(s.size_in_billions for s in specs), key=size_number)
    if size_in_billions is None:
        size = sizes[0]
        defaulted.append("size_in_billions")
    else:
        size = _resolve_size(size_in_billions, sizes, fmt)
    specs = [s for s in specs if s.size_in_billions == size]

    quants = unique(q for s in specs for q in s.quantizations)
    if quantization is None:
        if len(quants) > 1:
            raise NoMatchingSpec(
                f"{fmt} {size_display(size)}B comes in several quantizations: {', '.join(quants)}",
                "choose one with --quantization, e.g. -q " + quants[0])
        quant = quants[0]
        defaulted.append("quantization")
    else:
        try:
            quant = _pick(quantization, quants, "quantization",
                          "--quantization", f" for {fmt} {size_display(size)}B")
        except NoMatchingSpec as exc:
            raise _where_else(exc, fam, quantization, size_in_billions) from None
    entry = next(s for s in specs if quant in s.quantizations)

    hub_name = _resolve_hub(hub, defaulted)
    order = [hub_name] if hub_name != "auto" else list(settings.HUBS)
    sources = tuple(src for h in order if (src := entry.hub_source(h, quant)) is not None)
    if not sources:
        raise NoMatchingSpec(
            f"{fmt} {size_display(size)}B {quant} is not published on {hub_name}",
            "use --download-hub " + " or ".join(s.hub for s in entry.hubs))
    return ResolvedSpec(fam, engine, fmt, size, quant, hub_name, sources,
                        tuple(defaulted), entry.parameters)


def _where_else(exc: NoMatchingSpec, fam: Family, quantization: str, size: Any) -> NoMatchingSpec:
    """Add to a quantization that this format lacks the formats (and sizes) that have it."""
    wanted = quantization.strip().lower()
    found = [(s.model_format, s.size_in_billions) for s in fam.specs
             if any(q.lower() == wanted for q in s.quantizations)
             and (size is None or s.size_in_billions == _safe_size(size))]
    if not found:
        return exc
    where = {}
    for fmt, sz in found:
        where.setdefault(fmt, []).append(size_display(sz) + "B")
    places = "; ".join(f"-f {fmt} ({', '.join(szs)})" for fmt, szs in where.items())
    return NoMatchingSpec(exc.message, f"{quantization} exists for {places}; {exc.hint}")


def _safe_size(value: Any) -> str | None:
    try:
        return parse_size(value)
    except ValueError:
        return None


def _resolve_size(value: str | float, sizes: list[str], fmt: str) -> str:
    shown = ", ".join(size_display(s) for s in sizes)
    try:
        size = parse_size(value)
    except ValueError:
        raise NoMatchingSpec(f"--size-in-billions {value!r} is not a number",
                             f"sizes for {fmt} are {shown}") from None
    if size not in sizes:
        raise NoMatchingSpec(f"no {fmt} spec with size {size_display(size)}B; sizes are {shown}",
                             "pick one of those with --size-in-billions (-s)")
    return size


def _resolve_hub(hub: str | None, defaulted: list[str]) -> str:
    if hub is None:
        hub = settings.download_hub()
        defaulted.append("hub")
    choices = [*settings.HUBS, "auto"]
    value = hub.strip().lower()
    value = settings.HUB_ALIASES.get(value, value)
    if value not in choices:
        raise NoMatchingSpec(f"unknown hub {hub!r}{did_you_mean(hub, choices)}",
                             "valid values for --download-hub: " + ", ".join(choices) + " (or hf, ms)")
    return value


def spec_rows(catalogue: Catalogue) -> list[dict[str, Any]]:
    """One row per (spec, quantization): what `qvl list-specs` shows."""
    out = []
    for fam in catalogue.families:
        for spec in fam.specs:
            for quant in spec.quantizations:
                sources = {h.hub: spec.hub_source(h.hub, quant) for h in spec.hubs}
                out.append({
                    "model_name": fam.name,
                    "model_format": spec.model_format,
                    "size_in_billions": size_display(spec.size_in_billions),
                    "quantization": quant,
                    "engines": list(fam.engines),
                    "context_length": fam.context_length,
                    "parameters": spec.parameters,
                    "huggingface": _src_dict(sources.get("huggingface")),
                    "modelscope": _src_dict(sources.get("modelscope")),
                })
    return out


def _src_dict(source: HubSource | None) -> dict[str, str] | None:
    return None if source is None else {"model_id": source.model_id, "revision": source.revision}


def filter_rows(catalogue: Catalogue, model_name: str | None = None, model_format: str | None = None,
                size_in_billions: str | None = None, quantization: str | None = None,
                model_engine: str | None = None) -> list[dict[str, Any]]:
    """The list-specs rows matching the given filters (case-insensitive).

    A filter value that no row has is an error naming the valid values, so a typo does
    not silently print an empty table.
    """
    out = spec_rows(catalogue)
    filters = [("model_name", model_name, "--model-name"), ("model_format", model_format, "--model-format"),
               ("size_in_billions", size_in_billions, "--size-in-billions"),
               ("quantization", quantization, "--quantization"), ("engines", model_engine, "--model-engine")]
    for key, value, flag in filters:
        if value is None:
            continue
        wanted = value.strip().lower()
        if key == "engines":  # a list per row: keep the rows that list the engine
            choices = unique(e for r in out for e in r[key])
            matched = [r for r in out if wanted in (e.lower() for e in r[key])]
        else:
            choices = unique(r[key] for r in out)
            if key == "size_in_billions":
                try:
                    wanted = size_display(parse_size(value))
                except ValueError:
                    wanted = value
            matched = [r for r in out if r[key].lower() == wanted]
        if not matched:
            raise NoMatchingSpec(
                f"no spec with {flag} {value!r}{did_you_mean(value, choices)}",
                f"valid values for {flag} here: " + ", ".join(choices))
        out = matched
    return out
