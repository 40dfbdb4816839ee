"""The fit check, its refusal message, `-s auto`, and the commands that show them.

GPUs are simulated with QVL_FAKE_GPUS ("TOTAL[:FREE]" per GPU).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from qwenvl_cli.fit import check as fit
from qwenvl_cli.fit import gpus
from qwenvl_cli.fit import memory
from qwenvl_cli.catalogue.load import load_catalogue
from qwenvl_cli.catalogue.resolve import SpecQuery, resolve, spec_rows
from qwenvl_cli.errors import EXIT_FAILURE, DoesNotFit
from qwenvl_cli.fit.memory import GiB, Workload


@pytest.fixture
def machine(monkeypatch):
    """machine("24GiB:20GiB", gpu_idx=None) -> the GpuReport of a simulated machine."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def make(value: str, gpu_idx: str | None = None):
        monkeypatch.setenv(gpus.FAKE_ENV, value)
        return gpus.query(gpu_idx)
    return make


def _check(report, size, fmt=None, quant=None, workload=Workload()):
    return fit.check_fit(resolve(size_in_billions=size, model_format=fmt, quantization=quant),
                         report, workload)


def _need(size, fmt=None, quant=None, workload=Workload()) -> str:
    """The estimate as the messages print it, e.g. '18.4'."""
    spec = resolve(size_in_billions=size, model_format=fmt, quantization=quant)
    return gpus.gib(memory.estimate(spec, workload).total)


def _auto(report, workload=Workload(), **flags):
    return fit.resolve_and_check(SpecQuery(size_in_billions="auto", **flags), report=report, workload=workload)


# --- the auto choice on common cards --------------------------------------------------
# At the default workload (32,768 tokens of KV cache, one image at 1,280 visual tokens):
#  8 GB : 2B pytorch (~5.8 GiB). 7B's smallest, AWQ, needs ~9.2 GiB at full context.
# 24 GB : 7B pytorch (~18.4 GiB). The largest size that fits, unquantized; 72B needs 52 GiB.
# 48 GB : 7B pytorch. 72B AWQ needs ~52 GiB with its 10 GiB of KV cache for 32k tokens;
#         the reason says it fits with --context-length 18432 (at 47.5 GiB free), and with
#         that flag auto picks it.
# 80 GB : 72B awq Int4 (~52 GiB): 72B unquantized (151 GiB) and GPTQ-Int8 (86 GiB) do not
#         fit; AWQ and GPTQ-Int4 tie on bits and AWQ is the smaller (no group index).
@pytest.mark.parametrize("card,expected", [
    ("8GiB:7.6GiB", ("2", "pytorch", "none")),
    ("24GiB:23.5GiB", ("7", "pytorch", "none")),
    ("48GiB:47.5GiB", ("7", "pytorch", "none")),
    ("80GiB:79.2GiB", ("72", "awq", "Int4")),
])
def test_auto_on_common_cards(machine, card, expected):
    result = _auto(machine(card))
    spec = result.spec
    assert (spec.size_in_billions, spec.model_format, spec.quantization) == expected
    assert result.fits is True
    assert result.choice.reason.startswith(f"auto: picked {fit._short(expected)} (~")
    assert "the largest size, least quantized, that fits GPU 0" in result.choice.reason


def test_auto_explains_what_a_shorter_context_would_allow(machine):
    report = machine("48GiB:47.5GiB")
    reason = _auto(report).choice.reason
    family = load_catalogue().family("qwen2-vl-instruct")
    ctx = fit.max_context(family, ("72", "awq", "Int4"), report.gpus, Workload())
    assert 16384 <= ctx < 32768 and ctx % 1024 == 0
    assert f"72B awq Int4 would need ~{_need('72', 'awq')} GiB (it fits with --context-length {ctx})" in reason
    picked = _auto(report, Workload(context_length=ctx)).spec
    assert (picked.size_in_billions, picked.model_format) == ("72", "awq")
    assert _check(report, "72", "awq", workload=Workload(context_length=ctx)).fits
    assert not _check(report, "72", "awq", workload=Workload(context_length=ctx + 1024)).fits


def test_auto_respects_format_and_quantization(machine):
    report = machine("24GiB:23.5GiB")
    spec = _auto(report, model_format="gptq").spec
    assert (spec.size_in_billions, spec.quantization) == ("7", "Int8")
    spec = _auto(report, model_format="gptq", quantization="Int4").spec
    assert (spec.size_in_billions, spec.quantization) == ("7", "Int4")
    spec = _auto(machine("8GiB:7.6GiB"), model_format="awq").spec
    assert (spec.size_in_billions, spec.model_format) == ("2", "awq")


def test_auto_across_gpus(machine):
    result = _auto(machine("80GiB:79GiB,80GiB:79GiB"))
    assert (result.spec.size_in_billions, result.spec.model_format) == ("72", "pytorch")
    assert [g.index for g in result.placement.gpus] == [0, 1]
    assert all(share <= 79 * GiB for share in result.placement.shares)
    assert "fits GPUs 0,1" in result.choice.reason


def test_auto_without_a_gpu_picks_the_smallest_unquantized_spec_for_the_cpu(machine):
    for value, why in (("none", "no GPU is visible"), ("unknown", "no GPU could be probed")):
        result = _auto(machine(value))
        assert (result.spec.size_in_billions, result.spec.model_format) == ("2", "pytorch")
        assert result.choice.reason.startswith(f"auto: {why}")
        assert "to run on the CPU" in result.choice.reason
        assert result.fits is None


def test_auto_when_nothing_fits(machine):
    with pytest.raises(DoesNotFit) as info:
        _auto(machine("4GiB:3GiB"))
    assert info.value.message.startswith(
        f"no qwen2-vl-instruct spec fits: the smallest, 2B awq Int4, needs ~{_need('2', 'awq')} GiB")
    assert "GPU 0 (Simulated GPU 0) has 3.0 GiB free" in info.value.message
    assert "--context-length" in info.value.hint


# --- the refusal ----------------------------------------------------------------------


def test_refusal_names_a_spec_that_fits(machine):
    result = _check(machine("24GiB:11.8GiB"), "7")
    assert result.fits is False
    assert result.reason == (f"7B pytorch needs ~{_need('7')} GiB at 32,768 tokens of context, "
                             "GPU 0 (Simulated GPU 0) has 11.8 GiB free")
    with pytest.raises(DoesNotFit) as info:
        result.require()
    assert info.value.exit_code == EXIT_FAILURE
    assert info.value.hint == f"try `-f awq` (~{_need('7', 'awq')} GiB), or pass --force"
    result.require(force=True)  # --force goes ahead


def test_suggestion_flags_follow_what_the_user_typed(machine):
    report = machine("80GiB:79GiB")
    # -f gptq -q Int8 typed: the alternative must replace -q
    assert _check(report, "72", "gptq", "Int8").suggestion.startswith(
        f"`-f awq -q Int4` (~{_need('72', 'awq')} GiB) or `--context-length ")
    report = machine("24GiB:23GiB")
    assert _check(report, "72", "awq").suggestion == f"`-s 7 -f pytorch` (~{_need('7')} GiB)"
    assert _check(report, "72").suggestion == f"`-s 7` (~{_need('7')} GiB)"
    # an alternative is never larger than what was asked for
    assert "-s 72" not in (_check(machine("8GiB"), "7").suggestion or "")


def test_refusal_suggests_more_gpus(machine):
    report = machine("24GiB:11.8GiB,24GiB:11.8GiB", gpu_idx="0")
    result = _check(report, "7")
    assert result.fits is False and "`--gpu-idx 0,1`" in result.suggestion
    both = _check(machine("24GiB:11.8GiB,24GiB:11.8GiB"), "7")
    assert both.fits is True and both.verdict.startswith("yes, on GPUs 0,1 (")


def test_placement_uses_the_fewest_and_freest_gpus(machine):
    result = _check(machine("80GiB,80GiB"), "7")
    assert [g.index for g in result.placement.gpus] == [0]
    result = _check(machine("24GiB:2GiB,80GiB:70GiB"), "7")
    assert [g.index for g in result.placement.gpus] == [1]
    assert result.verdict == "yes, on GPU 1 (Simulated GPU 1)"


def test_unknown_free_memory_is_not_a_refusal(machine):
    result = _check(machine("80GiB:?"), "72")
    assert result.fits is None and result.verdict == "not checked: free memory unknown"
    result.require()
    result = _check(machine("unknown"), "72")
    assert result.fits is None and "GPU memory unknown" in result.reason


def test_spec_without_figures_is_not_checked(machine):
    spec = resolve(size_in_billions="7")
    family = replace(spec.family, sizes=())
    result = fit.check_fit(replace(spec, family=family), machine("1GiB"))
    assert result.fits is None and result.estimate is None
    assert result.verdict.startswith("not checked: qwen2-vl-instruct 7B pytorch: the spec file gives no")


def test_list_specs_rows_are_annotated(machine):
    catalogue = load_catalogue()
    rows = fit.annotate_rows(catalogue, spec_rows(catalogue), machine("24GiB:23GiB"))
    by_key = {(r["size_in_billions"], r["model_format"], r["quantization"]): r for r in rows}
    assert by_key[("7", "pytorch", "none")]["fits"] is True
    assert by_key[("72", "awq", "Int4")]["fits"] is False
    est = memory.estimate(resolve(size_in_billions="7"))
    assert by_key[("7", "pytorch", "none")]["memory_bytes"] == est.total


# --- the commands ---------------------------------------------------------------------


def test_resolve_shows_estimate_free_memory_and_verdict(qvl):
    proc = qvl("resolve", "-s", "7", env={gpus.FAKE_ENV: "24GiB:11.8GiB"})
    assert proc.returncode == 0, proc.stderr
    assert f"~{_need('7')} GiB (weights 15.4 + KV cache 1.8 at 32,768 tokens" in proc.stdout
    assert "GPU 0 (Simulated GPU 0): 11.8 of 24.0 GiB free" in proc.stdout
    assert f"no: 7B pytorch needs ~{_need('7')} GiB" in proc.stdout
    assert f"try `-f awq` (~{_need('7', 'awq')} GiB)" in proc.stdout


def test_resolve_auto_json_and_reason_on_stderr(qvl):
    proc = qvl("resolve", "-s", "auto", "--json", env={gpus.FAKE_ENV: "80GiB:79GiB"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["size_in_billions"], data["model_format"], data["quantization"]) == ("72", "awq", "Int4")
    assert data["auto"]["reason"].startswith("auto: picked 72B awq Int4")
    assert data["memory"]["total_bytes"] > 50 * GiB and data["fit"]["fits"] is True
    assert "auto: picked 72B awq Int4" in " ".join(proc.stderr.split())


def test_resolve_flags_change_the_estimate(qvl):
    env = {gpus.FAKE_ENV: "24GiB,24GiB"}
    proc = qvl("resolve", "-s", "7", "--context-length", "4096", "--max-pixels", str(16384 * 784),
               "--gpu-idx", "1", "--json", env=env)
    data = json.loads(proc.stdout)
    assert data["memory"]["context_length"] == 4096 and data["memory"]["visual_tokens"] == 16384
    assert data["fit"]["gpus"] == [1]
    bad = qvl("resolve", "--gpu-idx", "2", env=env)
    assert bad.returncode == 2 and "there is no GPU 2; visible GPUs: 0, 1" in bad.stderr


def test_list_specs_fit_column(qvl):
    proc = qvl("list-specs", "--fit", "--json", env={gpus.FAKE_ENV: "24GiB"})
    assert proc.returncode == 0, proc.stderr
    fits = {(r["size_in_billions"], r["model_format"], r["quantization"]): r["fits"]
            for r in json.loads(proc.stdout)}
    assert fits[("7", "pytorch", "none")] is True and fits[("72", "awq", "Int4")] is False
    table = qvl("list-specs", "--fit", "-s", "72", env={gpus.FAKE_ENV: "80GiB"})
    assert f"~{_need('72', 'awq')} GiB" in table.stdout and f"~{_need('72')} GiB" in table.stdout
    assert "GPUs: GPU 0 (Simulated GPU 0): 80.0 of 80.0 GiB free" in table.stderr
    plain = qvl("list-specs", "--json", env={gpus.FAKE_ENV: "24GiB"})
    assert "fits" not in json.loads(plain.stdout)[0]


def test_resolve_and_list_specs_import_nothing_heavy(tmp_path):
    """The probe imports pynvml only when it runs, and never torch & co."""
    import subprocess
    import sys

    from conftest import qvl_env

    code = ("import sys\nfrom qwenvl_cli.cli import app as cli\n"
            "for argv in (['resolve', '-s', 'auto'], ['list-specs', '--fit']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit as e:\n        assert not e.code, e.code\n"
            "heavy = {'torch', 'transformers', 'PIL', 'huggingface_hub', 'modelscope', 'torchvision'}\n"
            "print('HEAVY', sorted(heavy & set(sys.modules)))\n")
    env = qvl_env()
    env.pop(gpus.FAKE_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


@pytest.mark.parametrize("command", [["launch", "-s", "7"], ["download", "-s", "7"]])
def test_launch_and_download_print_the_estimate_next_to_the_free_memory(command):
    from conftest import run_qvl

    done = run_qvl(*command, env={gpus.FAKE_ENV: "24GiB", "HF_ENDPOINT": "http://127.0.0.1:9",
                                  "QVL_DOWNLOAD_HUB": "huggingface"})
    assert done.returncode == 1  # the hub is a closed port: the download fails after the check
    line = next(l for l in done.stderr.splitlines() if "needs ~" in l)
    assert "7B pytorch: needs ~18.4 GiB" in line and "24.0 of 24.0 GiB free" in line and "fits: yes" in line
