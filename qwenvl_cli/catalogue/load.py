"""The catalogue on disk: the built-in spec files, the user's on top, and a validated JSON copy.

The built-in catalogue ships in the wheel (``qwenvl_cli/specs/*.yaml``; in a checkout it is
read from ``specs/`` at the top of the repository). Every ``*.yaml`` in ``$QVL_HOME/specs``
is loaded on top.

The JSON copy lets commands which only list or resolve specs start without importing yaml
or validating again (about 15 ms of every start-up). It lives in
``$QVL_HOME/cache/catalogue.json`` and is keyed by the path, size and modification time of
every spec file and by qvl's version: editing, adding or removing a file, or upgrading qvl,
makes it stale, and it is rebuilt from the YAML. A copy that cannot be read or written is
ignored; the YAML is the truth.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qwenvl_cli import __version__, settings
from qwenvl_cli.catalogue.dims import ModelDims, VisionDims
from qwenvl_cli.catalogue.spec import Catalogue, Family, HubSource, SpecEntry
from qwenvl_cli.errors import CatalogueError

COPY_FORMAT = 1


def load_file(path: Path) -> Family:
    """Parse and validate one spec file (catalogue.parse; yaml is imported only here)."""
    from qwenvl_cli.catalogue.parse import parse_file

    return parse_file(path)


def builtin_specs_dir() -> Path:
    """The packaged catalogue (wheel) or, in a checkout, the top-level specs/ folder."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "specs"
    return packaged if packaged.is_dir() else package.parent / "specs"


def load_catalogue(user_dir: Path | None = None) -> Catalogue:
    """The built-in families, then every user ``*.yaml`` on top (from the validated JSON copy
    when no file changed since it was made)."""
    builtin = sorted(builtin_specs_dir().glob("*.yaml"))
    if not builtin:
        raise CatalogueError(f"no built-in spec files in {builtin_specs_dir()}",
                             "reinstall qvl: the package is incomplete")
    user_dir = settings.user_specs_dir() if user_dir is None else user_dir
    user = sorted(user_dir.glob("*.yaml")) if user_dir.is_dir() else []
    families = _read_copy(builtin + user)
    if families is None:
        families = _merge(builtin, user)
        _write_copy(builtin + user, families)
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


# --- the JSON copy ----------------------------------------------------------------



def copy_file() -> Path:
    return settings.qvl_home() / "cache" / "catalogue.json"


def _copy_key(paths: list[Path]) -> list[Any]:
    """What the copy must match: qvl's version and every file's path, size and mtime."""
    out: list[Any] = [COPY_FORMAT, __version__]
    for path in paths:
        stat = path.stat()
        out.append([str(path), stat.st_size, stat.st_mtime_ns])
    return out


def _read_copy(paths: list[Path]) -> tuple[Family, ...] | None:
    """The copied families for exactly these files, or None."""
    try:
        data = json.loads(copy_file().read_text(encoding="utf-8"))
        if data.get("key") != _copy_key(paths):
            return None
        return tuple(_family(raw) for raw in data["families"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_copy(paths: list[Path], families: tuple[Family, ...]) -> None:
    """Write the copy atomically; a read-only QVL_HOME just means no copy."""
    target = copy_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": _copy_key(paths), "families": [asdict(f) for f in families]}),
                       encoding="utf-8")
        tmp.replace(target)
    except OSError:
        pass


def _family(raw: dict[str, Any]) -> Family:
    specs = tuple(SpecEntry(s["model_format"], s["size_in_billions"], tuple(s["quantizations"]),
                            tuple(HubSource(**h) for h in s["hubs"]), s["parameters"]) for s in raw["specs"])
    sizes = tuple((size, ModelDims(**{**d, "vision": VisionDims(**d["vision"])})) for size, d in raw["sizes"])
    tuples = ("languages", "abilities", "engines", "stop_token_ids", "stop")
    return Family(**{**raw, **{k: tuple(raw[k]) for k in tuples}, "specs": specs, "sizes": sizes})
