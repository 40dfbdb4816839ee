"""The `sizes:` block of the spec YAML (architecture figures per size): strict validation."""

from __future__ import annotations

import pytest

from qwenvl_cli.catalogue.load import builtin_specs_dir, load_file
from qwenvl_cli.errors import CatalogueError

BUILTIN = builtin_specs_dir() / "qwen2-vl-instruct.yaml"
SEVEN = "  7:\n    hidden_size: 3584\n"


def _broken(tmp_path, old: str, new: str):
    text = BUILTIN.read_text(encoding="utf-8")
    assert old in text, old
    path = tmp_path / "broken.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def _error(path) -> str:
    with pytest.raises(CatalogueError) as info:
        load_file(path)
    assert str(path) in info.value.message
    return info.value.message


def test_builtin_sizes_give_the_published_parameter_counts():
    fam = load_file(BUILTIN)
    counts = {size: dims.total_parameters for size, dims in fam.sizes}
    assert counts == {"2": 2_208_985_600, "7": 8_291_375_616, "72": 73_405_560_320}
    seven = fam.dims("7")
    assert seven.kv_bytes_per_token() == 56 * 1024
    assert fam.dims("2").kv_bytes_per_token() == 28 * 1024
    assert fam.dims("72").kv_bytes_per_token() == 320 * 1024
    # the split the estimate uses adds up, and the 2B shares its embedding with the lm_head
    assert fam.dims("2").lm_head_parameters == 0
    parts = (seven.language_parameters + seven.vision_parameters + seven.embedding_parameters
             + seven.lm_head_parameters)
    assert parts == seven.total_parameters


def test_unknown_key_names_file_size_and_key(tmp_path):
    msg = _error(_broken(tmp_path, SEVEN, "  7:\n    hidden_sise: 3584\n"))
    assert "sizes: 7: hidden_sise" in msg and "did you mean hidden_size" in msg


def test_missing_key(tmp_path):
    msg = _error(_broken(tmp_path, "    intermediate_size: 18944\n", ""))
    assert "sizes: 7: intermediate_size: missing required key" in msg


@pytest.mark.parametrize("old,new,expected", [
    ("    num_hidden_layers: 80\n", "    num_hidden_layers: '80'\n", "sizes: 72: num_hidden_layers: must be a positive integer"),
    ("    head_dim: 128\n", "    head_dim: 0\n", "sizes: 2: head_dim: must be a positive integer"),
    ("    tie_word_embeddings: true\n", "    tie_word_embeddings: 1\n", "sizes: 2: tie_word_embeddings: must be true or false"),
    ("    num_key_value_heads: 4\n", "    num_key_value_heads: 5\n", "sizes: 7: num_key_value_heads: must divide"),
])
def test_wrong_values(tmp_path, old, new, expected):
    assert expected in _error(_broken(tmp_path, old, new))


def test_vision_is_checked_too(tmp_path):
    old = "vision: {depth: 32, embed_dim: 1280,"
    msg = _error(_broken(tmp_path, old, "vision: {depht: 32, embed_dim: 1280,"))
    assert "sizes: 2: vision: depht" in msg and "did you mean depth" in msg
    msg = _error(_broken(tmp_path, old, "vision: {depth: 32.5, embed_dim: 1280,"))
    assert "sizes: 2: vision: depth: must be a positive integer" in msg
    msg = _error(_broken(tmp_path, SEVEN, "  7:\n    vision_tower: 1\n    hidden_size: 3584\n"))
    assert "sizes: 7: vision_tower: unknown key" in msg


def test_sizes_must_match_the_specs(tmp_path):
    text = BUILTIN.read_text(encoding="utf-8")
    head, tail = text.split("\n  72:\n", 1)
    missing = tmp_path / "missing.yaml"
    missing.write_text(head + "\n", encoding="utf-8")
    assert "sizes: 72: missing: spec 9 (pytorch 72B) has this size" in _error(missing)
    extra = tmp_path / "extra.yaml"
    extra.write_text(head + "\n  13:\n" + tail + "  72:\n" + tail, encoding="utf-8")
    assert "sizes: 13: no spec has this size; sizes are 2, 7, 72" in _error(extra)
    assert "must be a mapping" in _error(_broken(tmp_path, SEVEN, "  7: 3584\n  8:\n    hidden_size: 3584\n"))
    assert "sizes: seven: must be a size" in _error(_broken(tmp_path, SEVEN, "  seven:\n    hidden_size: 3584\n"))


def test_parameter_count_must_agree_with_the_figures(tmp_path):
    msg = _error(_broken(tmp_path, "    intermediate_size: 18944\n", "    intermediate_size: 18945\n"))
    assert "spec 5 (pytorch 7B): parameters: 8,291,375,616 does not match the 8,291,676,672" in msg


def test_sizes_block_is_optional_for_user_families(tmp_path):
    text = BUILTIN.read_text(encoding="utf-8").split("\nsizes:\n")[0]
    path = tmp_path / "plain.yaml"
    path.write_text(text, encoding="utf-8")
    fam = load_file(path)
    assert fam.sizes == () and fam.dims("7") is None
