"""The shipped catalogue, its strict validation, and resolution of spec flags."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
from pathlib import Path

import pytest

from qwenvl_cli.catalogue import spec as specs

from qwenvl_cli.catalogue.load import load_catalogue, load_file

from qwenvl_cli.catalogue.resolve import filter_rows, resolve, spec_rows
from qwenvl_cli.errors import CatalogueError, NoMatchingSpec

# Written out independently of specs/qwen2-vl-instruct.yaml (from the reference catalogue):
# (format, size, quantization, huggingface id, modelscope id, huggingface revision)
EXPECTED = [
    ("pytorch", "2", "none", "Qwen/Qwen2-VL-2B-Instruct", "qwen/Qwen2-VL-2B-Instruct",
     "096da3b96240e3d66d35be0e5ccbe282eea8d6b1"),
    ("gptq", "2", "Int8", "Qwen/Qwen2-VL-2B-Instruct-GPTQ-Int8", "qwen/Qwen2-VL-2B-Instruct-GPTQ-Int8",
     "d15fb11857ccc566903e2e71341f9db7babb567b"),
    ("gptq", "2", "Int4", "Qwen/Qwen2-VL-2B-Instruct-GPTQ-Int4", "qwen/Qwen2-VL-2B-Instruct-GPTQ-Int4",
     "800d396518c82960ce6d231adecd07bbc474f0a9"),
    ("awq", "2", "Int4", "Qwen/Qwen2-VL-2B-Instruct-AWQ", "qwen/Qwen2-VL-2B-Instruct-AWQ",
     "ea8c5854c0044e28626719292de0d9b1a671f6fc"),
    ("pytorch", "7", "none", "Qwen/Qwen2-VL-7B-Instruct", "qwen/Qwen2-VL-7B-Instruct",
     "6010982c1010c3b222fa98afc81575f124aa9bd6"),
    ("gptq", "7", "Int8", "Qwen/Qwen2-VL-7B-Instruct-GPTQ-Int8", "qwen/Qwen2-VL-7B-Instruct-GPTQ-Int8",
     "3d152a77eaccfd72d59baedb0b183a1b8fd56e48"),
    ("gptq", "7", "Int4", "Qwen/Qwen2-VL-7B-Instruct-GPTQ-Int4", "qwen/Qwen2-VL-7B-Instruct-GPTQ-Int4",
     "5ab897112fa83b9699826be8753ef9184585c77d"),
    ("awq", "7", "Int4", "Qwen/Qwen2-VL-7B-Instruct-AWQ", "qwen/Qwen2-VL-7B-Instruct-AWQ",
     "f94216e8b513933bccd567bcd9b7350199f32538"),
    ("pytorch", "72", "none", "Qwen/Qwen2-VL-72B-Instruct", "qwen/Qwen2-VL-72B-Instruct", "main"),
    ("awq", "72", "Int4", "Qwen/Qwen2-VL-72B-Instruct-AWQ", "qwen/Qwen2-VL-72B-Instruct-AWQ", "main"),
    ("gptq", "72", "Int4", "Qwen/Qwen2-VL-72B-Instruct-GPTQ-Int4", "qwen/Qwen2-VL-72B-Instruct-GPTQ-Int4", "main"),
    ("gptq", "72", "Int8", "Qwen/Qwen2-VL-72B-Instruct-GPTQ-Int8", "qwen/Qwen2-VL-72B-Instruct-GPTQ-Int8", "main"),
]


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue(user_dir=Path("/nonexistent"))


def test_shipped_catalogue_has_eleven_specs_and_twelve_rows(catalogue):
    fam = catalogue.family("qwen2-vl-instruct")
    assert len(fam.specs) == 11
    assert len(spec_rows(catalogue)) == 12
    assert fam.context_length == 32768
    assert fam.languages == ("en", "zh")
    assert fam.abilities == ("chat", "vision")
    assert fam.architecture == "Qwen2VLForConditionalGeneration"
    assert fam.engines == ("transformers", "vllm")
    assert set(fam.stop_token_ids) == {151645, 151643}
    assert fam.description.startswith("Qwen2-VL: To See the World More Clearly.")


@pytest.mark.parametrize("fmt,size,quant,hf_id,ms_id,hf_rev", EXPECTED)
def test_every_spec_resolves_to_the_right_repos(catalogue, fmt, size, quant, hf_id, ms_id, hf_rev):
    spec = resolve(size_in_billions=size, model_format=fmt, quantization=quant,
                         hub="huggingface", catalogue=catalogue)
    assert (spec.model_format, spec.size_in_billions, spec.quantization) == (fmt, size, quant)
    assert spec.model_id == hf_id
    assert spec.revision == hf_rev
    ms = resolve(size_in_billions=size, model_format=fmt, quantization=quant,
                       hub="modelscope", catalogue=catalogue)
    assert ms.model_id == ms_id
    assert ms.revision == "master"
    assert [s.hub for s in ms.sources] == ["modelscope"]


def test_rows_match_expected_table(catalogue):
    got = {(r["model_format"], r["size_in_billions"], r["quantization"]):
           (r["huggingface"]["model_id"], r["modelscope"]["model_id"]) for r in spec_rows(catalogue)}
    want = {(f, s, q): (h, m) for f, s, q, h, m, _ in EXPECTED}
    assert got == want


def test_defaults_pick_2b_pytorch_and_record_what_was_defaulted(catalogue):
    spec = resolve(catalogue=catalogue)
    assert (spec.model_format, spec.size_in_billions, spec.quantization) == ("pytorch", "2", "none")
    assert set(spec.defaulted) == {"model_name", "model_engine", "model_format",
                                   "size_in_billions", "quantization", "hub"}
    assert spec.hub == "auto"
    assert [s.hub for s in spec.sources] == ["huggingface", "modelscope"]


def test_format_alone_picks_smallest_size_with_that_format(catalogue):
    spec = resolve(model_format="awq", catalogue=catalogue)
    assert spec.size_in_billions == "2" and spec.quantization == "Int4"
    assert "size_in_billions" in spec.defaulted and "model_format" not in spec.defaulted


def test_acceptance_7b_awq(catalogue):
    spec = resolve(size_in_billions="7", model_format="awq", catalogue=catalogue)
    assert spec.model_id == "Qwen/Qwen2-VL-7B-Instruct-AWQ"
    assert spec.quantization == "Int4"
    assert spec.uid == "qwen2-vl-instruct-7b-awq-int4"


def test_ambiguous_quantization_lists_choices(catalogue):
    with pytest.raises(NoMatchingSpec) as info:
        resolve(size_in_billions="72", model_format="gptq", catalogue=catalogue)
    assert "Int4" in info.value.message and "Int8" in info.value.message
    assert info.value.exit_code == 2
    with pytest.raises(NoMatchingSpec, match="Int4, Int8|Int8, Int4"):
        resolve(model_format="gptq", catalogue=catalogue)  # 2B GPTQ: two specs


def test_matching_is_case_insensitive(catalogue):
    spec = resolve(size_in_billions="72", model_format="GPTQ", quantization="int8",
                         hub="ModelScope", catalogue=catalogue)
    assert spec.model_id == "qwen/Qwen2-VL-72B-Instruct-GPTQ-Int8"
    assert spec.quantization == "Int8" and spec.model_format == "gptq"
    assert resolve(model_name="QWEN2-VL-INSTRUCT", model_engine="Transformers",
                         catalogue=catalogue).model_engine == "transformers"


@pytest.mark.parametrize("kwargs,fragment,hint_fragment", [
    ({"model_format": "awk"}, "did you mean awq", "pytorch, gptq, awq"),
    ({"size_in_billions": "8"}, "size 8B; sizes are 2, 7, 72", "--size-in-billions"),
    ({"size_in_billions": "seven"}, "not a number", "2, 7, 72"),
    ({"model_format": "awq", "quantization": "Int8"}, "quantization 'Int8'", "Int4"),
    ({"model_name": "qwen2-vl-instrukt"}, "did you mean qwen2-vl-instruct", "qwen2-vl-instruct"),
    ({"model_engine": "llama.cpp"}, "engine 'llama.cpp'", "transformers, vllm"),
    ({"hub": "hugginface"}, "did you mean huggingface", "auto"),
])
def test_no_match_names_the_value_and_valid_choices(catalogue, kwargs, fragment, hint_fragment):
    with pytest.raises(NoMatchingSpec) as info:
        resolve(catalogue=catalogue, **kwargs)
    assert fragment in info.value.message
    assert hint_fragment in info.value.hint


def test_resolution_never_mutates_the_catalogue(catalogue):
    before = copy.deepcopy(catalogue)
    resolve(size_in_billions="72", model_format="gptq", quantization="Int4", catalogue=catalogue)
    assert catalogue == before
    raw = catalogue.family("qwen2-vl-instruct").specs[-1]
    assert "{quantization}" in raw.hubs[0].model_id  # the template is still there
    with pytest.raises(dataclasses.FrozenInstanceError):
        raw.model_format = "x"  # type: ignore[misc]


@pytest.mark.parametrize("value,expected", [
    (2, "2"), ("7", "7"), ("72B", "72"), (1.5, "1_5"), ("1.5", "1_5"), ("1_5", "1_5"), ("0.5", "0_5"),
])
def test_parse_size(value, expected):
    assert specs.parse_size(value) == expected


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "nan", "inf", True])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        specs.parse_size(bad)


# --- validation with broken YAML fixtures ---------------------------------------------

GOOD = """
family:
  name: tiny-vl
  context_length: 4096
  architecture: Qwen2VLForConditionalGeneration
  engines: [transformers]
specs:
  - model_format: pytorch
    size_in_billions: 1_5
    quantizations: [none]
    hubs:
      huggingface: {model_id: org/tiny-1.5B, revision: abc}
  - model_format: gptq
    size_in_billions: 0.5
    quantizations: [Int4, Int8]
    hubs:
      huggingface: {model_id: "org/tiny-0.5B-GPTQ-{quantization}"}
      modelscope: {model_id: "org/tiny-0.5B-GPTQ-{quantization}", revision: master}
"""


def write(tmp_path: Path, text: str, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_user_file_loads_with_fractional_sizes(tmp_path):
    fam = load_file(write(tmp_path, GOOD))
    assert [s.size_in_billions for s in fam.specs] == ["1_5", "0_5"]
    cat = specs.Catalogue((fam,))
    spec = resolve(model_name="tiny-vl", size_in_billions="1.5", catalogue=cat, hub="huggingface")
    assert spec.model_id == "org/tiny-1.5B" and spec.revision == "abc"
    spec = resolve(model_name="tiny-vl", model_format="gptq", quantization="int8", catalogue=cat)
    assert spec.size_in_billions == "0_5"
    assert spec.sources[0].model_id == "org/tiny-0.5B-GPTQ-Int8"
    assert spec.sources[0].revision == "main"  # default branch when no revision is given


@pytest.mark.parametrize("old,new,fragments", [
    ("  engines: [transformers]", "  engines: [transformers]\n  colour: blue",
     ["family: colour", "unknown key"]),
    ("    quantizations: [none]", "    quantizations: [none]\n    quantisation: x",
     ["spec 1 (pytorch 1.5B): quantisation", "unknown key"]),
    ("context_length: 4096", "context_length: big", ["family: context_length", "integer"]),
    ("size_in_billions: 1_5", "size_in_billions: -3", ["spec 1: size_in_billions", "positive number"]),
    ("size_in_billions: 1_5", "size_in_billions: zero", ["spec 1: size_in_billions", "positive number"]),
    ("quantizations: [none]", "quantizations: []", ["spec 1 (pytorch 1.5B): quantizations", "at least one"]),
    ("quantizations: [none]", "quantizations: none", ["quantizations", "must be a list"]),
    ('huggingface: {model_id: "org/tiny-0.5B-GPTQ-{quantization}"}',
     "huggingface: {model_id: org/tiny-0.5B-GPTQ}",
     ["spec 2 (gptq 0.5B): hubs: huggingface: model_id", "no {quantization} placeholder"]),
    ("huggingface: {model_id: org/tiny-1.5B, revision: abc}",
     'huggingface: {model_id: "org/tiny-1.5B-{quantization}"}',
     ["spec 1 (pytorch 1.5B): hubs: huggingface: model_id", "lists only none"]),
    ("huggingface: {model_id: org/tiny-1.5B, revision: abc}",
     'huggingface: {model_id: "org/tiny-{size}B"}', ["unknown placeholder {size}"]),
    ("      modelscope:", "      modelscop:", ["spec 2 (gptq 0.5B): hubs: modelscop", "did you mean modelscope"]),
    ("huggingface: {model_id: org/tiny-1.5B, revision: abc}",
     "huggingface: {model_id: org/tiny-1.5B, revision: 3}", ["hubs: huggingface: revision", "string"]),
    ("specs:\n", "specs:\n  - {model_format: gptq, size_in_billions: 0.5, quantizations: [Int8], "
     "hubs: {huggingface: {model_id: org/other}}}\n", ["spec 3 (gptq 0.5B)", "duplicates spec 1", "gptq 0.5B Int8"]),
    ("  name: tiny-vl\n", "", ["family: name", "missing required key"]),
])
def test_validation_errors_name_file_spec_and_key(tmp_path, old, new, fragments):
    text = textwrap.dedent(GOOD)
    assert old in text, old
    path = write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(CatalogueError) as info:
        load_file(path)
    message = info.value.message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert info.value.exit_code == 1


def test_invalid_yaml_syntax_names_the_line(tmp_path):
    path = write(tmp_path, "family: [unclosed\nspecs: []\n")
    with pytest.raises(CatalogueError, match=r"not valid YAML at line \d+"):
        load_file(path)


# --- user spec directory --------------------------------------------------------------

def test_user_specs_dir_adds_a_family(tmp_path):
    user = tmp_path / "specs"
    user.mkdir()
    write(user, GOOD)
    cat = load_catalogue(user_dir=user)
    assert cat.names() == ["qwen2-vl-instruct", "tiny-vl"]


def test_user_specs_dir_defaults_to_qvl_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_HOME", str(tmp_path))
    (tmp_path / "specs").mkdir()
    write(tmp_path / "specs", GOOD)
    assert "tiny-vl" in load_catalogue().names()


def test_user_family_with_builtin_name_needs_overrides(tmp_path):
    user = tmp_path / "specs"
    user.mkdir()
    text = textwrap.dedent(GOOD).replace("name: tiny-vl", "name: qwen2-vl-instruct")
    write(user, text)
    with pytest.raises(CatalogueError, match="is a built-in model") as info:
        load_catalogue(user_dir=user)
    assert "overrides: true" in info.value.hint
    write(user, text.replace("  engines: [transformers]", "  engines: [transformers]\n  overrides: true"))
    cat = load_catalogue(user_dir=user)
    fam = cat.family("qwen2-vl-instruct")
    assert fam.overrides and fam.context_length == 4096
    assert resolve(size_in_billions="1.5", catalogue=cat).model_id == "org/tiny-1.5B"


def test_two_user_files_with_the_same_family_are_an_error(tmp_path):
    user = tmp_path / "specs"
    user.mkdir()
    write(user, GOOD, "a.yaml")
    write(user, GOOD, "b.yaml")
    with pytest.raises(CatalogueError, match="also defined in"):
        load_catalogue(user_dir=user)


def test_filter_rows(catalogue):
    rows = filter_rows(catalogue, model_format="GPTQ", size_in_billions="72")
    assert [r["quantization"] for r in rows] == ["Int4", "Int8"]
    assert len(filter_rows(catalogue, quantization="int4")) == 6  # 2B, 7B x gptq, awq; 72B awq, gptq
    with pytest.raises(NoMatchingSpec, match="did you mean awq"):
        filter_rows(catalogue, model_format="awk")


# --- the validated JSON copy ----------------------------------------------------------

def test_catalogue_copy_is_reused_and_equal_to_the_yaml(tmp_path, monkeypatch):
    from qwenvl_cli.catalogue import load as catalogue_load

    monkeypatch.setenv("QVL_HOME", str(tmp_path / "home"))
    first = load_catalogue()
    assert catalogue_load.copy_file().exists()
    monkeypatch.setattr(catalogue_load, "_merge", lambda *a: pytest.fail("the YAML was read again"))
    assert load_catalogue() == first


def test_catalogue_copy_goes_stale_when_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_HOME", str(tmp_path / "home"))
    user = tmp_path / "home" / "specs"
    user.mkdir(parents=True)
    path = write(user, GOOD)
    assert "tiny-vl" in load_catalogue().names()
    path.write_text(textwrap.dedent(GOOD).replace("name: tiny-vl", "name: tiny-vl-two"))
    assert "tiny-vl-two" in load_catalogue().names()
    path.unlink()
    assert load_catalogue().names() == ["qwen2-vl-instruct"]
    write(user, textwrap.dedent(GOOD).replace("context_length: 4096", "context_length: big"))
    with pytest.raises(CatalogueError):  # a bad file is an error, never hidden by the copy
        load_catalogue()


def test_a_broken_copy_is_ignored(tmp_path, monkeypatch):
    from qwenvl_cli.catalogue import load as catalogue_load

    monkeypatch.setenv("QVL_HOME", str(tmp_path / "home"))
    first = load_catalogue()
    catalogue_load.copy_file().write_text('{"key": "x", "families": ')
    assert load_catalogue() == first


def test_second_start_imports_no_yaml(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import qvl_env

    code = ("import sys\nfrom qwenvl_cli.catalogue import load\nload.load_catalogue()\n"
            "print('yaml' in sys.modules)")
    env = qvl_env({"QVL_HOME": str(tmp_path / "home")})
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=60).stdout.strip() for _ in range(2)]
    assert [json.loads(r.lower()) for r in runs] == [True, False]


def test_a_quantization_this_format_lacks_names_the_formats_that_have_it(catalogue):
    with pytest.raises(NoMatchingSpec) as info:
        resolve(quantization="Int4", catalogue=catalogue)  # the format defaulted to pytorch
    assert "Int4 exists for -f gptq (2B, 7B, 72B); -f awq (2B, 7B, 72B)" in info.value.hint
    with pytest.raises(NoMatchingSpec) as info:
        resolve(size_in_billions="72", model_format="awq", quantization="int8", catalogue=catalogue)
    assert "exists for -f gptq (72B)" in info.value.hint
