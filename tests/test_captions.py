"""Captioning inputs for `qvl batch`: a folder of images or a Parquet file, with --prompt."""

from __future__ import annotations

import importlib.util
import io

import pytest

from qwenvl_cli.batch import files as batch_io
from qwenvl_cli.batch.files import Request
from qwenvl_cli.errors import UsageError
from qwenvl_cli.generation import GenerationParams


def _png(color=(10, 200, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _parts(request: Request) -> tuple[str, str]:
    content = request.messages[0]["content"]
    image = next(p for p in content if p["type"] == "image")
    text = next(p for p in content if p["type"] == "text")
    return image["image"], text["text"]


def test_a_folder_of_images_is_one_request_per_image_with_the_prompt(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.png").write_bytes(_png())
    (tmp_path / "sub" / "a.PNG").write_bytes(_png((1, 2, 3)))
    (tmp_path / "notes.txt").write_text("not an image")
    items = batch_io.read_input(tmp_path, GenerationParams(), prompt="Caption it.")
    assert [item.id for item in items] == ["b.png", "sub/a.PNG"]
    assert all(isinstance(item, Request) for item in items)
    image, text = _parts(items[0])
    assert text == "Caption it." and str(image).endswith("b.png")


def test_prompt_rules(tmp_path):
    with pytest.raises(UsageError, match="--prompt"):
        batch_io.read_input(tmp_path, GenerationParams())
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(UsageError, match="--prompt is for a folder"):
        batch_io.read_input(source, GenerationParams(), prompt="p")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="Parquet needs pyarrow (qvl[ray])")
def test_a_parquet_file_with_an_image_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rel.png").write_bytes(_png())
    table = pa.table({"id": ["x", "y"], "image": pa.array([_png(), (tmp_path / "rel.png").read_bytes()])})
    pq.write_table(table, tmp_path / "in.parquet")
    items = batch_io.read_input(tmp_path / "in.parquet", GenerationParams(), prompt="What is it?")
    assert [item.id for item in items] == ["x", "y"] and all(isinstance(i, Request) for i in items)
    assert str(_parts(items[0])[0]).startswith("data:image/png;base64,")  # bytes travel inline
    paths = pa.table({"image": ["rel.png"]})
    pq.write_table(paths, tmp_path / "paths.parquet")
    (item,) = batch_io.read_input(tmp_path / "paths.parquet", GenerationParams(), prompt="p")
    assert item.id == 0 and str(_parts(item)[0]).endswith("rel.png")
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "none.parquet")
    with pytest.raises(UsageError, match="no image column"):
        batch_io.read_input(tmp_path / "none.parquet", GenerationParams(), prompt="p")
