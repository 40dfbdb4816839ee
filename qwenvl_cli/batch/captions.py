"""Captioning jobs: a folder of images, or a Parquet file with an image column, and one ``--prompt``.

Each image becomes the request line ``{"id": ..., "messages": [{"role": "user", "content":
[image, prompt]}]}`` that a JSONL input would hold, so it is checked, answered, written and
resumed exactly like one (:func:`qwenvl_cli.batch.files.parse_line`). Ids: the image's path
relative to the folder; for Parquet, the ``id`` column where there is one, else the row number.
A Parquet image cell may be a path or URL (string), the image's bytes, or a ``{"bytes", "path"}``
struct (what Hugging Face ``datasets`` writes); bytes travel as a ``data:`` URI.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from qwenvl_cli.errors import MissingDependency, UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_COLUMNS = ("image", "images", "img", "image_path", "path", "url")
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"RIFF", "image/webp"),
          (b"GIF8", "image/gif"), (b"BM", "image/bmp"))


def is_caption_input(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in (".parquet", ".pq")


def lines(path: Path, prompt: str | None) -> list[str]:
    """The JSON request lines of a folder or a Parquet file (UsageError without --prompt)."""
    if not prompt:
        raise UsageError(f"{path} is a {'folder' if path.is_dir() else 'Parquet file'} of images: "
                         "say what to ask of each with --prompt", 'e.g. --prompt "Describe this picture."')
    items = _folder(path) if path.is_dir() else _parquet(path)
    return [json.dumps({"id": id_, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": ref}}, {"type": "text", "text": prompt}]}]})
        for id_, ref in items]


def _folder(root: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p.relative_to(root).as_posix(), str(p.resolve())) for p in files]


def _parquet(path: Path) -> list[tuple[Any, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency("reading Parquet needs pyarrow, which is not installed",
                                'pip install pyarrow (qvl[ray] brings it)') from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as Parquet: {exc}", "give a Parquet file, a folder or a JSONL file") from None
    column = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if column is None:
        raise UsageError(f"{path} has no image column (looked for {', '.join(IMAGE_COLUMNS)}; it has "
                         f"{', '.join(table.column_names)})", "name the column of images 'image'")
    ids = table.column("id").to_pylist() if "id" in table.column_names else range(table.num_rows)
    return [(id_, _ref(cell, path.parent)) for id_, cell in zip(ids, table.column(column).to_pylist())]


def _ref(cell: Any, base: Path) -> str:
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        mime = next((m for magic, m in _MAGIC if bytes(cell[:4]).startswith(magic)), "image/jpeg")
        return f"data:{mime};base64," + base64.b64encode(bytes(cell)).decode()
    if isinstance(cell, str) and cell and "://" not in cell and not cell.startswith("data:"):
        return str((base / cell).resolve()) if not Path(cell).is_absolute() else cell
    return cell if isinstance(cell, str) else ""
