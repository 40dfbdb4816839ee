"""The catalogue's records: sizes, hub sources, spec entries, families, the resolved spec.

Everything here is frozen; loading (catalogue.load) and resolution (catalogue.resolve)
build new objects and never change the catalogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qwenvl_cli.catalogue.dims import ModelDims
from qwenvl_cli.errors import NoMatchingSpec, did_you_mean

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


def unique(items) -> list:
    """The items in their first order, without repeats."""
    return list(dict.fromkeys(items))
