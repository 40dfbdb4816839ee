"""AWQ and GPTQ checkpoints: the backend preflight, the module-name normalisation, and tiny
checkpoints in the published format loaded through qvl's engine and compared with the
unquantized model.

The preflight and normalisation tests run everywhere. The loading tests need the backend
(`pip install "qvl[quant]"`; CI runs them in its quant stage, .ci/quant) and skip without it.

Bounds, for an image prompt's logits (all positions) on CPU in float32, as relative L2 error
||a - b|| / ||b||:

- quantized engine vs the *dequantized* float model (the tiny model with each quantized
  weight replaced by the value its packed integers stand for): <= 0.01. What is left is the
  kernels' own rounding (measured 0.0007). A packing mistake is far above: AWQ nibbles in
  sequential order 1.37, GPTQ Int4 zeros not stored minus one 1.42, the same for Int8 0.06.
- quantized engine vs the *unquantized* tiny model: <= 0.45 for Int4, <= 0.04 for Int8.
  This is the quantization error itself. Round-to-nearest with group size 64 on Gaussian
  weights leaves a per-weight error of step/sqrt(12): about 9% of the weight spread for 4
  bits (step = spread of the group / 15) and about 0.5% for 8 bits (/255). It compounds
  through the 14 quantized layers into 0.29 (AWQ, GPTQ Int4) and 0.020 (Int8) on the
  logits, which for this random model are nearly flat (std 0.15), so the argmax agrees at
  71-74% of positions for Int4 and 100% for Int8. Real checkpoints are calibrated (AWQ,
  GPTQ) and have peaked logits; the bound only says the answers come from this model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys

import pytest

from qwenvl_cli.engine import quant
from qwenvl_cli.fit import packages
from qwenvl_cli.errors import EngineError, MissingDependency, translate

from conftest import REPO, load_script, qvl_env

FORMATS = ("awq", "gptq-int4", "gptq-int8")
HAS_BACKEND = all(importlib.util.find_spec(n) is not None for n in ("gptqmodel", "optimum"))
needs_backend = pytest.mark.skipif(
    not HAS_BACKEND, reason='gptqmodel/optimum not installed (pip install "qvl[quant]"; CI: .ci/quant)')
PUBLISHED_AWQ = {"bits": 4, "group_size": 128, "modules_to_not_convert": ["visual"],
                 "quant_method": "awq", "version": "gemm", "zero_point": True}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


needs_gpu = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def fixtures(quantized_fixtures):
    return quantized_fixtures


# --- the preflight: no backend, no heavy import -------------------------------------------------


@pytest.mark.parametrize("fmt, missing", [("awq", "gptqmodel"), ("gptq", "gptqmodel")])
def test_missing_backend_names_the_install_command(monkeypatch, fmt, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # find_spec answers None, import fails
    with pytest.raises(MissingDependency) as info:
        packages.require_backend(fmt, "cpu")
    assert packages.install_command(fmt) in info.value.message and missing in info.value.message
    assert info.value.exit_code == 1 and "\n" not in info.value.message


def test_install_hint_follows_where_qvl_was_installed(monkeypatch, tmp_path):
    """A checkout gets the README's command run there (the registry may not have qvl at all);
    a wheel / PyPI install gets the extra by name; a `pip install .` finds its checkout through
    direct_url.json."""
    from qwenvl_cli import install

    readme_quant = 'pip install -c constraints.txt -c constraints-quant.txt ".[quant]"'
    assert readme_quant in (REPO / "README.md").read_text() and readme_quant in (REPO / "docs" / "quantization.md").read_text()
    assert install.checkout_root() == REPO  # these tests run from the checkout
    assert packages.install_command("awq") == f"cd {REPO} && {readme_quant}"
    assert packages.install_command("gptq", upgrade=True) == f"cd {REPO} && {readme_quant.replace('install', 'install -U')}"

    checkout = tmp_path / "qvl src"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text('[project]\nname = "qvl"\n')
    (checkout / "constraints.txt").write_text("")
    dir_url = json.dumps({"url": checkout.as_uri(), "dir_info": {}})
    wheel_url = json.dumps({"url": (tmp_path / "qvl-0.1.0-py3-none-any.whl").as_uri(), "archive_info": {}})
    assert install.checkout_from_direct_url(dir_url) == checkout
    assert install.checkout_from_direct_url(wheel_url) is None and install.checkout_from_direct_url(None) is None

    class Dist:
        def __init__(self, text):
            self.text = text

        def read_text(self, name):
            return self.text if name == "direct_url.json" else None

    real = install._is_checkout
    monkeypatch.setattr(install, "_is_checkout", lambda folder: folder != REPO and real(folder))  # site-packages
    for text, expected in ((dir_url, f"cd '{checkout}' && {readme_quant}"), (wheel_url, 'pip install "qvl[awq]"'),
                           (None, 'pip install "qvl[awq]"')):
        monkeypatch.setattr(importlib.metadata, "distribution", lambda name, t=text: Dist(t))
        assert packages.install_command("awq") == expected


def test_gptq_without_optimum_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum", None)
    with pytest.raises(MissingDependency, match="optimum"):
        packages.require_backend("GPTQ", "cuda")


def test_unquantized_formats_need_nothing():
    assert packages.require_backend("pytorch") is None and packages.require_backend("") is None


def _fake_backend(root, cpu_kernels: bool):
    for name in ("gptqmodel", "optimum"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
    if cpu_kernels:
        for path in packages.CPU_KERNELS.values():
            (root / "gptqmodel" / path).parent.mkdir(parents=True, exist_ok=True)
            (root / "gptqmodel" / path).write_text("")


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_says_whether_the_installed_backend_runs_on_cpu(tmp_path, monkeypatch, cpu_kernels):
    _fake_backend(tmp_path, cpu_kernels)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("gptqmodel", "optimum"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    on_gpu = packages.require_backend("awq", "cuda")
    assert on_gpu.cpu is cpu_kernels and on_gpu.notes == ()
    assert ("CPU" in on_gpu.describe()) is cpu_kernels
    if cpu_kernels:
        assert "slower" in packages.require_backend("gptq", "cpu").notes[0]
    else:
        with pytest.raises(EngineError, match="no CPU kernel for GPTQ") as info:
            packages.require_backend("gptq", "cpu")
        assert "CUDA" in info.value.hint


def test_auto_device_asks_the_gpu_probe(tmp_path, monkeypatch):
    _fake_backend(tmp_path, cpu_kernels=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("gptqmodel", "optimum"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("QVL_FAKE_GPUS", "24GiB")
    assert packages.require_backend("awq", "auto").cpu is False
    for nothing in ("none", "unknown"):
        monkeypatch.setenv("QVL_FAKE_GPUS", nothing)
        with pytest.raises(EngineError, match="runs on CUDA GPUs only"):
            packages.require_backend("awq", "auto")


def test_preflight_imports_nothing_heavy():
    code = ("import sys; from qwenvl_cli.fit import packages\n"
            "sys.modules['gptqmodel'] = None\n"
            "try:\n    packages.require_backend('awq', 'cpu')\nexcept Exception as e:\n    print(e)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'optimum') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=qvl_env(), capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert out == [f"AWQ checkpoints need gptqmodel, which is not installed: {packages.install_command('awq')}", "[]"]


def test_engine_stops_before_loading_without_the_backend(fixtures, monkeypatch):
    from qwenvl_cli.engine.engine import Engine
    from qwenvl_cli.engine.options import EngineOptions

    monkeypatch.setitem(sys.modules, "gptqmodel", None)
    with pytest.raises(MissingDependency, match=re.escape(packages.install_command("gptq"))):
        Engine.load(fixtures["gptq-int8"], EngineOptions(device="cpu"))


def test_transformers_backend_errors_are_translated():
    name_error = translate(NameError("name 'QuantizeConfig' is not defined"))
    assert isinstance(name_error, MissingDependency) and packages.install_command("gptq") in name_error.message
    awq = translate(ImportError("Loading an AWQ quantized model requires gptqmodel. Please install it"))
    assert isinstance(awq, MissingDependency) and packages.install_command("awq") in awq.message
    assert translate(ImportError("No module named 'foo'")) is None


# --- the published configs and their module names ------------------------------------------------


def test_module_paths_of_the_published_layout():
    assert quant.module_path("visual") == "model.visual"
    assert quant.module_path("visual.merger") == "model.visual.merger"
    assert quant.module_path("model.layers") == "model.language_model.layers"
    for same in ("model.visual", "model.language_model.layers", "lm_head"):
        assert quant.module_path(same) == same


def test_published_awq_exclusion_also_names_the_transformers5_tower():
    fixed, notes = quant.normalise(PUBLISHED_AWQ, {"visual.blocks.0.attn.qkv.weight"})
    assert fixed["modules_to_not_convert"] == ["visual", "model.visual"]
    assert PUBLISHED_AWQ["modules_to_not_convert"] == ["visual"]  # the input is not changed
    assert "model.visual" in notes[0]


def test_awq_without_exclusion_keeps_an_unquantized_tower_16bit():
    qc = {k: v for k, v in PUBLISHED_AWQ.items() if k != "modules_to_not_convert"}
    assert quant.normalise(qc, {"visual.blocks.0.attn.qkv.weight"})[0]["modules_to_not_convert"] == [
        "visual", "model.visual"]
    stored_quantized = {"visual.blocks.0.attn.qkv.qweight"}
    assert "modules_to_not_convert" not in quant.normalise(qc, stored_quantized)[0]


def test_gptq_block_name_of_the_published_layout_is_mapped():
    qc = {"quant_method": "gptq", "bits": 4, "block_name_to_quantize": "model.layers"}
    assert quant.normalise(qc)[0]["block_name_to_quantize"] == "model.language_model.layers"
    assert quant.normalise({"quant_method": "gptq", "bits": 4}) == ({"quant_method": "gptq", "bits": 4}, [])


def test_fixtures_have_the_published_layout(fixtures, tiny_model):
    from safetensors import safe_open

    for fmt, folder in fixtures.items():
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        if fmt == "awq":
            assert qc == {**PUBLISHED_AWQ, "group_size": 64}
        else:
            assert qc["quant_method"] == "gptq" and qc["bits"] == int(fmt[-1]) and qc["sym"] is True
            assert qc["group_size"] == 64 and qc["desc_act"] is False
            assert "block_name_to_quantize" not in qc and "modules_to_not_convert" not in qc
        with safe_open(folder / "model.safetensors", "pt") as f:
            names = set(f.keys())
            assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype.is_floating_point is False
        assert {n.rsplit(".", 1)[-1] for n in names if ".self_attn.q_proj." in n} == (
            {"qweight", "qzeros", "scales", "bias"} | ({"g_idx"} if fmt != "awq" else set()))
        assert not any(n.startswith("visual.") and n.endswith(".qweight") for n in names)
        assert "visual.blocks.0.attn.qkv.weight" in names
        assert quant.stored_tensor_names(folder) == names
        assert sum(p.stat().st_size for p in folder.iterdir()) < 600_000
    assert quant.inspect(tiny_model) is None


def test_fixture_packing_round_trips(tiny_model):
    import torch

    script = load_script("make_quantized_fixtures")
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    for method, bits in (("awq", 4), ("gptq", 4), ("gptq", 8)):
        quantize = script.quantize_asymmetric if method == "awq" else script.quantize_symmetric
        q, scales, zeros = quantize(w, bits, 64)
        assert 0 <= int(q.min()) and int(q.max()) < 2 ** bits
        assert (script.fake_quantize(w, method, bits, 64) - w).abs().max() <= scales.max() / 2 + 1e-6
        order = script.AWQ_ORDER if method == "awq" else None
        packed = script.pack_columns(q, bits, order)
        assert torch.equal(script.unpack_columns(packed, bits, order), q)
        assert torch.equal(script.unpack_rows(script.pack_rows(q, bits), bits), q)


def test_inspect_normalises_the_awq_fixture(fixtures):
    awq = quant.inspect(fixtures["awq"])
    assert (awq.method, awq.bits, awq.label()) == ("awq", 4, "AWQ Int4")
    assert awq.config["modules_to_not_convert"] == ["visual", "model.visual"]
    assert awq.load_config(on_gpu=False)["backend"] == "torch_awq"
    assert "backend" not in awq.load_config(on_gpu=True)
    gptq = quant.inspect(fixtures["gptq-int8"])
    assert (gptq.label(), gptq.notes, gptq.load_config(False)["backend"]) == ("GPTQ Int8", (), "gptq_torch")


def test_script_says_which_group_size(tiny_model, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_quantized_fixtures.py"), str(tmp_path),
                           "--tiny", str(tiny_model), "--formats", "gptq-int8"], env=qvl_env(),
                          capture_output=True, text=True, timeout=120, check=True)
    assert "group size 64 (not the published 128" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-gptq-int8"]


@pytest.mark.skipif(HAS_BACKEND, reason="the backend is installed here; this checks the missing case")
@pytest.mark.parametrize("command", [["launch", "-s", "7", "-f", "awq"], ["chat", "-s", "2", "-f", "gptq", "-q", "Int4", "hi"]])
def test_launch_and_chat_stop_before_any_download_without_the_backend(command):
    from conftest import run_qvl

    # a hub on a closed port: any attempt to download would end in "cannot reach" instead
    done = run_qvl(*command, env={"HF_ENDPOINT": "http://127.0.0.1:9", "QVL_DOWNLOAD_HUB": "huggingface"})
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and packages.install_command("awq") in lines[0]
    assert "cannot reach" not in done.stderr and "Traceback" not in done.stderr
