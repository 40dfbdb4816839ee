"""The YAML model-spec catalogue: load, validate strictly, resolve flags to one spec.

The built-in catalogue ships in the wheel (``qvl_cli/specs/*.yaml``; in a checkout it is
read from ``specs/`` at the top of the repository). Every ``*.yaml`` in
``$QVL_HOME/specs`` is loaded on top. Everything returned is frozen; resolution builds new
objects and never changes the catalogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import settings
from .dims import ModelDims
from .errors import CatalogueError, NoMatchingSpec, did_you_mean

NO_QUANTIZATION = "none"
PLACEHOLDER = "{quantization}"

# --- sizes ----------------------------------------------------------------------------


def parse_size(value: object) -> str:
    """Normalise a size in billions to its identifier form: 7 -> '7', 1.5 / '1_5' -> '1_5'.

    Raises ValueError for anything that is not a positive finite number.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    text = str(value).strip().lower().removesuffix("b").replace("_", ".")
    number = float(text)  # ValueError for junk
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{value!r} is not a positive number")
    if number == int(number):
        return str(int(number))
    return repr(number).replace(".", "_")


def size_number(size: str) -> float:
    return float(size.replace("_", "."))


def size_display(size: str) -> str:
    """'1_5' -> '1.5' (how sizes are written on the command line)."""
    return size.replace("_", ".")


# --- data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    hub: str
    model_id: str
    revision: str


@dataclass(frozen=True)
class SpecEntry:
    """One spec of the catalogue, as written (model ids may hold ``{quantization}``)."""

    model_format: str
    size_in_billions: str
    quantizations: tuple[str, ...]
    hubs: tuple[HubSource, ...]
    parameters: int | None = None

    def hub_source(self, hub: str, quantization: str) -> HubSource | None:
        for source in self.hubs:
            if source.hub == hub:
                model_id = source.model_id.replace(PLACEHOLDER, quantization)
                return HubSource(hub, model_id, source.revision)
        return None


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    context_length: int
    languages: tuple[str, ...]
    abilities: tuple[str, ...]
    architecture: str
    engines: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    stop: tuple[str, ...]
    specs: tuple[SpecEntry, ...]
    source_file: str
    overrides: bool = False
    sizes: tuple[tuple[str, ModelDims], ...] = ()  # (size, architecture figures) pairs

    def dims(self, size: str) -> ModelDims | None:
        """The architecture figures of one size, or None when the spec file gives none."""
        return dict(self.sizes).get(size)


@dataclass(frozen=True)
class ResolvedSpec:
    """Exactly one concrete spec: what `launch` would download and load."""

    family: Family
    model_engine: str
    model_format: str
    size_in_billions: str
    quantization: str
    hub: str  # huggingface | modelscope | auto
    sources: tuple[HubSource, ...]  # every hub that has it, in the order to try
    defaulted: tuple[str, ...] = ()
    parameters: int | None = None

    @property
    def model_name(self) -> str:
        return self.family.name

    @property
    def dims(self) -> ModelDims | None:
        return self.family.dims(self.size_in_billions)

    @property
    def source(self) -> HubSource:
        """The source for the chosen hub (the first one for ``auto``)."""
        return self.sources[0]

    @property
    def model_id(self) -> str:
        return self.source.model_id

    @property
    def revision(self) -> str:
        return self.source.revision

    @property
    def uid(self) -> str:
        """Default model UID, e.g. ``qwen2-vl-instruct-7b-awq-int4``."""
        parts = [self.family.name, f"{self.size_in_billions}b", self.model_format]
        if self.quantization != NO_QUANTIZATION:
            parts.append(self.quantization)
        return "-".join(parts).lower()

    def label(self) -> str:
        quant = "" if self.quantization == NO_QUANTIZATION else f" {self.quantization}"
        return f"{self.family.name} {size_display(self.size_in_billions)}B {self.model_format}{quant}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.family.name,
            "model_engine": self.model_engine,
            "model_format": self.model_format,
            "size_in_billions": size_display(self.size_in_billions),
            "quantization": self.quantization,
            "hub": self.source.hub,
            "model_id": self.model_id,
            "revision": self.revision,
            "sources": [vars(s) for s in self.sources],
            "context_length": self.family.context_length,
            "defaulted": list(self.defaulted),
        }


@dataclass(frozen=True)
class Catalogue:
    families: tuple[Family, ...] = field(default_factory=tuple)

    def names(self) -> list[str]:
        return [f.name for f in self.families]

    def family(self, name: str) -> Family:
        for fam in self.families:
            if fam.name.lower() == name.lower():
                return fam
        raise NoMatchingSpec(
            f"no model named {name!r}{did_you_mean(name, self.names())}",
            "models are: " + ", ".join(self.names()),
        )


# --- loading -------------------------------------------------------------------------------


def load_file(path: Path) -> Family:
    """Parse and validate one spec file (see spec_loader)."""
    from .spec_loader import load_file as _load

    return _load(path)


def builtin_specs_dir() -> Path:
    """The packaged catalogue (wheel) or, in a checkout, the top-level specs/ folder."""
    here = Path(__file__).resolve().parent
    packaged = here / "specs"
    return packaged if packaged.is_dir() else here.parent / "specs"


def load_catalogue(user_dir: Path | None = None) -> Catalogue:
    """The built-in families, then every user ``*.yaml`` on top (from the validated JSON copy
    when no file changed since it was made: see spec_cache)."""
    from . import spec_cache

    builtin = sorted(builtin_specs_dir().glob("*.yaml"))
    if not builtin:
        raise CatalogueError(f"no built-in spec files in {builtin_specs_dir()}",
                             "reinstall qvl: the package is incomplete")
    user_dir = settings.user_specs_dir() if user_dir is None else user_dir
    user = sorted(user_dir.glob("*.yaml")) if user_dir.is_dir() else []
    families = spec_cache.load(builtin + user)
    if families is None:
        families = _merge(builtin, user)
        spec_cache.store(builtin + user, families)
    return Catalogue(families)


def _merge(builtin: list[Path], user: list[Path]) -> tuple[Family, ...]:
    """Load every file; a user family may replace a built-in one only with `overrides: true`."""
    families: dict[str, Family] = {}
    for path in builtin:
        fam = load_file(path)
        families[fam.name.lower()] = fam
    builtin_names = set(families)
    for path in user:
        fam = load_file(path)
        key = fam.name.lower()
        if key in families:
            if key in builtin_names and not fam.overrides:
                raise CatalogueError(
                    f"{path}: family: name: {fam.name!r} is a built-in model",
                    "rename it, or add `overrides: true` under family to replace the built-in one")
            if key not in builtin_names:
                raise CatalogueError(f"{path}: family: name: {fam.name!r} is also defined in "
                                     f"{families[key].source_file}", "keep one of the two files")
        builtin_names.discard(key)
        families[key] = fam
    return tuple(families.values())


# --- resolution -----------------------------------------------------------------------


def _pick(value: str, choices: list[str], what: str, flag: str, context: str) -> str:
    for choice in choices:
        if choice.lower() == value.strip().lower():
            return choice
    raise NoMatchingSpec(
        f"no spec with {what} {value!r}{context}{did_you_mean(value, choices)}",
        f"valid values for {flag}: " + ", ".join(choices),
    )


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def resolve(
    model_name: str | None = None,
    model_engine: str | None = None,
    size_in_billions: str | float | None = None,
    model_format: str | None = None,
    quantization: str | None = None,
    hub: str | None = None,
    catalogue: Catalogue | None = None,
) -> ResolvedSpec:
    """Turn the spec flags into exactly one concrete spec, or raise NoMatchingSpec."""
    catalogue = catalogue if catalogue is not None else load_catalogue()
    defaulted: list[str] = []
    if model_name is None:
        model_name, _ = settings.DEFAULT_MODEL_NAME, defaulted.append("model_name")
    fam = catalogue.family(model_name)
    if model_engine is None:
        model_engine, _ = fam.engines[0], defaulted.append("model_engine")
    engine = _pick(model_engine, list(fam.engines), "engine", "--model-engine", "")
    specs = list(fam.specs)

    formats = _unique(s.model_format for s in specs)
    if model_format is None:
        model_format = "pytorch" if "pytorch" in formats else formats[0]
        defaulted.append("model_format")
    fmt = _pick(model_format, formats, "format", "--model-format", "")
    specs = [s for s in specs if s.model_format == fmt]

    sizes = sorted(_unique(s.size_in_billions for s in specs), key=size_number)
    if size_in_billions is None:
        size = sizes[0]
        defaulted.append("size_in_billions")
    else:
        size = _resolve_size(size_in_billions, sizes, fmt)
    specs = [s for s in specs if s.size_in_billions == size]

    quants = _unique(q for s in specs for q in s.quantizations)
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
    if value not in choices:
        raise NoMatchingSpec(f"unknown hub {hub!r}{did_you_mean(hub, choices)}",
                             "valid values for --download-hub: " + ", ".join(choices))
    return value


def rows(catalogue: Catalogue) -> list[dict[str, Any]]:
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
                size_in_billions: str | None = None, quantization: str | None = None
                ) -> list[dict[str, Any]]:
    """The list-specs rows matching the given filters (case-insensitive).

    A filter value that no row has is an error naming the valid values, so a typo does
    not silently print an empty table.
    """
    out = rows(catalogue)
    filters = [("model_name", model_name, "--model-name"), ("model_format", model_format, "--model-format"),
               ("size_in_billions", size_in_billions, "--size-in-billions"),
               ("quantization", quantization, "--quantization")]
    for key, value, flag in filters:
        if value is None:
            continue
        choices = _unique(r[key] for r in out)
        wanted = value.strip().lower()
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
