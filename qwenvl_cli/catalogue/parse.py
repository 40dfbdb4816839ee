"""Loading and strict validation of spec YAML files (imported only when the catalogue cache
misses: see catalogue.load). Every problem is a CatalogueError naming the file, the spec and the key.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwenvl_cli import settings
from qwenvl_cli.catalogue import dims as dims_mod
from qwenvl_cli.catalogue.dims import ModelDims
from qwenvl_cli.catalogue.spec import PLACEHOLDER, Family, HubSource, SpecEntry, parse_size, size_display, unique
from qwenvl_cli.errors import CatalogueError, did_you_mean

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")

_FAMILY_KEYS = {
    "name": str, "description": str, "context_length": int, "languages": list,
    "abilities": list, "architecture": str, "engines": list, "stop_token_ids": list,
    "stop": list, "overrides": bool,
}
_FAMILY_REQUIRED = {"name", "context_length", "architecture", "engines"}
_SPEC_KEYS = {
    "model_format": str, "size_in_billions": (int, float, str), "quantizations": list,
    "hubs": dict, "parameters": int,
}
_SPEC_REQUIRED = {"model_format", "size_in_billions", "quantizations", "hubs"}
_HUB_KEYS = {"model_id": str, "revision": str}
_TOP_KEYS = {"family": dict, "specs": list, "sizes": dict}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping", bool: "true or false"}


def _yaml_loader() -> type:
    """A SafeLoader whose integers have no underscores, so ``1_5`` stays the string '1_5'."""
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present

    class Loader(base):  # type: ignore[misc,valid-type]
        pass

    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    int_re = re.compile(r"^(?:[-+]?0|[-+]?[1-9][0-9]*)$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", int_re, list("-+0123456789"))
    return Loader


class _Where:
    """Builds 'file: spec 3 (awq 7B): key' prefixes for validation errors."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> CatalogueError:
        return CatalogueError(
            f"{self.path}: {where}: {problem}",
            "fix the spec file (see specs/qwen2-vl-instruct.yaml for the format)",
        )


def _check_keys(data: dict, allowed: dict, required: set, where: str, w: _Where) -> None:
    for key in data:
        if key not in allowed:
            raise w.fail(f"{where}: {key}", "unknown key" + did_you_mean(str(key), allowed)
                         + "; allowed keys are " + ", ".join(sorted(allowed)))
    for key in sorted(required - set(data)):
        raise w.fail(f"{where}: {key}", "missing required key")
    for key, kind in allowed.items():
        if key in data:
            value = data[key]
            kinds = kind if isinstance(kind, tuple) else (kind,)
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            if not ok:
                wanted = " or ".join(_TYPE_NAMES[k] for k in kinds)
                raise w.fail(f"{where}: {key}", f"must be {wanted}, not {value!r}")


def _str_list(value: list, where: str, w: _Where, kind: type = str) -> tuple:
    for item in value:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise w.fail(where, f"every item must be {_TYPE_NAMES[kind]}, not {item!r}")
    return tuple(value)


def _spec_label(raw: dict, index: int) -> str:
    """'spec 3 (awq 7B)' when format and size are readable, else 'spec 3'."""
    try:
        return f"spec {index} ({raw['model_format'].strip()} {size_display(parse_size(raw['size_in_billions']))}B)"
    except (KeyError, ValueError, AttributeError):
        return f"spec {index}"


def _parse_spec(raw: object, index: int, w: _Where) -> SpecEntry:
    if not isinstance(raw, dict):
        raise w.fail(f"spec {index}", "must be a mapping")
    where = _spec_label(raw, index)
    _check_keys(raw, _SPEC_KEYS, _SPEC_REQUIRED, where, w)
    try:
        size = parse_size(raw["size_in_billions"])
    except ValueError:
        raise w.fail(f"{where}: size_in_billions",
                     f"must be a positive number, not {raw['size_in_billions']!r}") from None
    fmt = raw["model_format"].strip()
    quants = _str_list(raw["quantizations"], f"{where}: quantizations", w)
    if not quants:
        raise w.fail(f"{where}: quantizations", "must list at least one quantization")
    if len({q.lower() for q in quants}) != len(quants):
        raise w.fail(f"{where}: quantizations", "lists a quantization twice")
    if not raw["hubs"]:
        raise w.fail(f"{where}: hubs", "must name at least one hub")
    sources = []
    for hub, info in raw["hubs"].items():
        if hub not in settings.HUBS:
            raise w.fail(f"{where}: hubs: {hub}", "unknown hub" + did_you_mean(str(hub), settings.HUBS)
                         + "; hubs are " + ", ".join(settings.HUBS))
        if not isinstance(info, dict):
            raise w.fail(f"{where}: hubs: {hub}", "must be a mapping with model_id and revision")
        _check_keys(info, _HUB_KEYS, {"model_id"}, f"{where}: hubs: {hub}", w)
        model_id = info["model_id"]
        _check_placeholders(model_id, quants, f"{where}: hubs: {hub}: model_id", w)
        sources.append(HubSource(hub, model_id, info.get("revision") or "main"))
    parameters = raw.get("parameters")
    if parameters is not None and parameters <= 0:
        raise w.fail(f"{where}: parameters", "must be a positive integer")
    return SpecEntry(fmt, size, quants, tuple(sources), parameters)


def _check_placeholders(model_id: str, quants: tuple[str, ...], where: str, w: _Where) -> None:
    names = _PLACEHOLDER_RE.findall(model_id)
    for name in names:
        if name != "quantization":
            raise w.fail(where, f"unknown placeholder {{{name}}}; only {PLACEHOLDER} is allowed")
    if len(quants) > 1 and not names:
        raise w.fail(where, f"the spec lists {len(quants)} quantizations ({', '.join(quants)}) "
                            f"but the id has no {PLACEHOLDER} placeholder")
    if len(quants) == 1 and names:
        raise w.fail(where, f"the id has a {PLACEHOLDER} placeholder but the spec lists only "
                            f"{quants[0]}; write the id out in full")


def _parse_family(data: object, path: Path) -> Family:
    w = _Where(path)
    if not isinstance(data, dict):
        raise w.fail("top level", "must be a mapping with 'family' and 'specs'")
    _check_keys(data, _TOP_KEYS, {"family", "specs"}, "top level", w)
    fam = data["family"]
    _check_keys(fam, _FAMILY_KEYS, _FAMILY_REQUIRED, "family", w)
    if fam["context_length"] <= 0:
        raise w.fail("family: context_length", "must be a positive integer")
    engines = _str_list(fam["engines"], "family: engines", w)
    if not engines:
        raise w.fail("family: engines", "must list at least one engine")
    specs = tuple(_parse_spec(raw, i, w) for i, raw in enumerate(data["specs"], start=1))
    if not specs:
        raise w.fail("specs", "must list at least one spec")
    seen: dict[tuple, int] = {}
    for i, spec in enumerate(specs, start=1):
        for quant in spec.quantizations:
            key = (spec.model_format.lower(), spec.size_in_billions, quant.lower())
            if key in seen:
                raise w.fail(f"spec {i} ({spec.model_format} {size_display(spec.size_in_billions)}B)",
                             f"duplicates spec {seen[key]}: both give {spec.model_format} "
                             f"{size_display(spec.size_in_billions)}B {quant}")
            seen[key] = i
    sizes = _parse_sizes(data.get("sizes"), specs, w)
    return Family(
        name=fam["name"], description=fam.get("description", ""),
        context_length=fam["context_length"],
        languages=_str_list(fam.get("languages", []), "family: languages", w),
        abilities=_str_list(fam.get("abilities", []), "family: abilities", w),
        architecture=fam["architecture"], engines=engines,
        stop_token_ids=_str_list(fam.get("stop_token_ids", []), "family: stop_token_ids", w, int),
        stop=_str_list(fam.get("stop", []), "family: stop", w),
        specs=specs, source_file=str(path), overrides=fam.get("overrides", False),
        sizes=sizes,
    )


def _parse_sizes(raw: dict | None, specs: tuple[SpecEntry, ...], w: _Where
                 ) -> tuple[tuple[str, ModelDims], ...]:
    """Validate the optional `sizes:` mapping (size -> architecture figures) against the specs."""
    if raw is None:
        return ()
    out: dict[str, ModelDims] = {}
    for key, value in raw.items():
        try:
            size = parse_size(key)
        except ValueError:
            raise w.fail(f"sizes: {key}", "must be a size in billions, like 7 or 1_5") from None
        out[size] = dims_mod.parse(value, f"sizes: {key}", w.fail)
    sizes = unique(s.size_in_billions for s in specs)
    for size in out:
        if size not in sizes:
            raise w.fail(f"sizes: {size_display(size)}", "no spec has this size; sizes are "
                         + ", ".join(size_display(s) for s in sizes))
    for i, spec in enumerate(specs, start=1):
        where = f"spec {i} ({spec.model_format} {size_display(spec.size_in_billions)}B)"
        arch = out.get(spec.size_in_billions)
        if arch is None:
            raise w.fail(f"sizes: {size_display(spec.size_in_billions)}",
                         f"missing: {where} has this size")
        if spec.parameters is not None and spec.parameters != arch.total_parameters:
            raise w.fail(f"{where}: parameters",
                         f"{spec.parameters:,} does not match the {arch.total_parameters:,} that "
                         f"sizes: {size_display(spec.size_in_billions)} gives")
    return tuple(out.items())


def parse_file(path: Path) -> Family:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read: {exc.strerror}", "check the file") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise CatalogueError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}",
                             "fix the YAML syntax") from None
    return _parse_family(data, path)
