"""A JSON copy of the validated catalogue, so that commands which only list or resolve specs
start without importing yaml or validating again (about 15 ms of every start-up).

The copy lives in ``$QVL_HOME/cache/catalogue.json`` and is keyed by the path, size and
modification time of every spec file and by qvl's version: editing, adding or removing a
file, or upgrading qvl, makes it stale, and it is rebuilt from the YAML. A copy that cannot
be read or written is ignored; the YAML is the truth.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import __version__, settings
from .dims import ModelDims, VisionDims
from .specs import Family, HubSource, SpecEntry

FORMAT = 1


def cache_file() -> Path:
    return settings.qvl_home() / "cache" / "catalogue.json"


def key(paths: list[Path]) -> list[Any]:
    """What the copy must match: qvl's version and every file's path, size and mtime."""
    out: list[Any] = [FORMAT, __version__]
    for path in paths:
        stat = path.stat()
        out.append([str(path), stat.st_size, stat.st_mtime_ns])
    return out


def load(paths: list[Path]) -> tuple[Family, ...] | None:
    """The cached families for exactly these files, or None."""
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
        if data.get("key") != key(paths):
            return None
        return tuple(_family(raw) for raw in data["families"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(paths: list[Path], families: tuple[Family, ...]) -> None:
    """Write the copy atomically; a read-only QVL_HOME just means no copy."""
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key(paths), "families": [asdict(f) for f in families]}),
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
