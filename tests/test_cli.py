"""The command line: output, exit codes, error rendering, start-up imports, generated docs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from qwenvl_cli import __version__
from qwenvl_cli.cli.app import app, main

from conftest import REPO, qvl_env, run_qvl

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"qvl {__version__}"


def test_help_lists_every_command_with_a_summary():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "list-specs" in result.stdout and "resolve" in result.stdout
    assert "Examples" in result.stdout


def test_list_specs_table_and_json():
    table = runner.invoke(app, ["list-specs"])
    assert table.exit_code == 0
    assert "Qwen/Qwen2-VL-72B-Instruct-GPTQ-Int8" in table.stdout
    assert "modelscope same name" in table.stdout  # qwen/... on ModelScope: said once, not per row
    data = json.loads(runner.invoke(app, ["list-specs", "--json"]).stdout)
    assert len(data) == 12
    assert {d["modelscope"]["model_id"] for d in data if d["size_in_billions"] == "7"} >= {"qwen/Qwen2-VL-7B-Instruct-AWQ"}
    assert {d["model_format"] for d in data} == {"pytorch", "gptq", "awq"}
    assert all(d["engines"] == ["transformers", "vllm"] for d in data)


def test_list_specs_filters():
    data = json.loads(runner.invoke(app, ["list-specs", "-s", "72", "-f", "gptq", "--json"]).stdout)
    assert [(d["size_in_billions"], d["quantization"]) for d in data] == [("72", "Int4"), ("72", "Int8")]


def test_list_specs_model_engine_filter(capsys):
    data = json.loads(runner.invoke(app, ["list-specs", "--model-engine", "Transformers", "--json"]).stdout)
    assert len(data) == 12 and all("transformers" in d["engines"] for d in data)
    short = json.loads(runner.invoke(app, ["list-specs", "-en", "transformers", "-s", "2", "--json"]).stdout)
    assert {d["size_in_billions"] for d in short} == {"2"}
    code, _, err = run_main(["list-specs", "--model-engine", "transformer"], capsys)
    assert code == 2 and "did you mean transformers?" in err


@pytest.mark.parametrize("short, hub", [("hf", "huggingface"), ("ms", "modelscope"), ("HF", "huggingface")])
def test_download_hub_short_names(short, hub):
    """The tables print hf / ms; the flag takes them too."""
    data = json.loads(runner.invoke(app, ["resolve", "-s", "7", "-f", "awq", "--download-hub", short, "--json"]).stdout)
    assert data["hub"] == hub


def test_resolve_acceptance_7b_awq_json():
    result = runner.invoke(app, ["resolve", "-s", "7", "-f", "awq", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_id"] == "Qwen/Qwen2-VL-7B-Instruct-AWQ"
    assert data["quantization"] == "Int4"
    assert "quantization" in data["defaulted"]
    ms = json.loads(runner.invoke(app, ["resolve", "-s", "7", "-f", "awq", "--json",
                                        "--download-hub", "modelscope"]).stdout)
    assert ms["model_id"] == "qwen/Qwen2-VL-7B-Instruct-AWQ" and ms["hub"] == "modelscope"


def test_resolve_long_flag_names_and_table():
    result = runner.invoke(app, ["resolve", "--model-name", "qwen2-vl-instruct", "--model-engine",
                                 "transformers", "--size-in-billions", "72", "--model-format", "gptq",
                                 "--quantization", "Int8"])
    assert result.exit_code == 0, result.output
    assert "Qwen/Qwen2-VL-72B-Instruct-GPTQ-Int8" in result.stdout
    assert "(default)" in result.stdout  # the hub was defaulted


def test_download_hub_from_environment(monkeypatch):
    monkeypatch.setenv("QVL_DOWNLOAD_HUB", "modelscope")
    data = json.loads(runner.invoke(app, ["resolve", "-s", "2", "--json"]).stdout)
    assert data["model_id"] == "qwen/Qwen2-VL-2B-Instruct"


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_ambiguous_spec_is_one_line_with_hint_and_exit_2(capsys):
    code, out, err = run_main(["resolve", "-s", "72", "-f", "gptq"], capsys)
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "Int4" in lines[0] and "Int8" in lines[0]
    assert lines[1].startswith("hint:") and len(lines) == 2
    assert "Traceback" not in err


def test_typo_suggests_close_match(capsys):
    code, _, err = run_main(["resolve", "-f", "awk"], capsys)
    assert code == 2 and "did you mean awq?" in err


def test_unknown_flag_is_usage_error_exit_2(capsys):
    code, _, err = run_main(["resolve", "--bogus"], capsys)
    assert code == 2 and "No such option" in err


@pytest.mark.parametrize("argv, says", [
    (["launch", "--sise", "2"], "No such option: --sise"),
    (["chat", "--max-tokens", "many", "hi"], "Invalid value for '--max-tokens': 'many' is not a valid int."),
    (["terminate", "a", "b"], "unexpected extra argument"),
    (["frobnicate"], "No such command 'frobnicate'."),
])
def test_option_parsing_errors_are_one_line_and_a_hint_not_a_panel(argv, says):
    """click's errors read like qvl's own (the README's promise): error line, hint line, exit 2."""
    proc = run_qvl(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("error: ") and says in lines[0]
    assert lines[1].startswith("hint: run `qvl") and "--help`" in lines[1]
    assert not any(ch in proc.stderr for ch in "╭╰│")


def test_help_and_bare_qvl_still_print_the_help():
    assert run_qvl("launch", "--help").returncode == 0
    bare = run_qvl()
    assert bare.returncode == 2 and "Usage: qvl" in bare.stdout + bare.stderr and "error:" not in bare.stderr


def test_invalid_user_yaml_exits_1_naming_the_file(tmp_path, monkeypatch, capsys):
    specs_dir = tmp_path / "qvl" / "specs"
    specs_dir.mkdir(parents=True)
    (specs_dir / "mine.yaml").write_text("family: {name: x}\nspecs: []\nextra: 1\n")
    monkeypatch.setenv("QVL_HOME", str(tmp_path / "qvl"))
    code, out, err = run_main(["list-specs"], capsys)
    assert code == 1 and out == ""
    assert "mine.yaml" in err and "extra" in err and "Traceback" not in err


def test_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys):
    import qwenvl_cli.catalogue.load as catalogue_load

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(catalogue_load, "load_catalogue", boom)
    code, _, err = run_main(["list-specs"], capsys)
    assert code == 1 and "unexpected error: RuntimeError: kaput" in err and "QVL_DEBUG=1" in err
    monkeypatch.setenv("QVL_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaput"):
        main(["list-specs"])


def test_real_process_exit_codes_and_streams():
    ok = run_qvl("resolve", "-s", "7", "-f", "awq", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["quantization"] == "Int4"
    bad = run_qvl("resolve", "-s", "72", "-f", "gptq")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Int4" in bad.stderr and "Int8" in bad.stderr and "Traceback" not in bad.stderr


HEAVY = ["torch", "torchvision", "transformers", "modelscope", "modelscope_hub", "PIL", "huggingface_hub",
         "av", "decord", "qwen_vl_utils", "fastapi", "starlette", "uvicorn", "openai", "httpx", "numpy"]


@pytest.mark.parametrize("argv", [["--help"], ["list-specs"], ["list-specs", "--json"],
                                  ["resolve", "-s", "7", "-f", "awq"], ["resolve", "--json"],
                                  ["list", "--json"], ["terminate", "--all"], ["launch", "--help"],
                                  ["cached", "--json"]])
def test_start_up_imports_nothing_heavy(argv):
    code = textwrap.dedent(f"""
        import json, sys
        from qwenvl_cli.cli.app import main
        try:
            main({argv!r})
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(json.dumps(heavy), file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=qvl_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []


def test_cli_reference_is_current():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_cli_docs.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "qwenvl_cli", "--version"], env=qvl_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == f"qvl {__version__}"


def _narrow_console(monkeypatch, width=80):
    import io

    from rich.console import Console

    from qwenvl_cli import render

    buffer = io.StringIO()
    monkeypatch.setattr(render, "stdout_console", lambda: Console(file=buffer, width=width, highlight=False))
    return buffer


def test_list_specs_fits_80_columns_one_line_per_spec(monkeypatch, capsys):
    """Columns the same on every row are said once below; each spec stays on one line."""
    buffer = _narrow_console(monkeypatch)
    code, _, err = run_main(["list-specs"], capsys)
    assert code == 0, err
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    ids = [line for line in lines if "Qwen/Qwen2-VL-" in line]
    assert len(ids) == 12 and all(line.split()[-1].startswith("Qwen/Qwen2-VL-") for line in ids)
    assert "on every row: name qwen2-vl-instruct, engines transformers, vllm, modelscope same name" in \
        " ".join(buffer.getvalue().split())
    assert "engines" not in lines[1] and "name " not in lines[1]


def test_wide_cells_fold_and_short_ones_stay_whole(monkeypatch):
    """A cached-style table at 80 columns: the long path folds, sizes and states never break."""
    from qwenvl_cli import render

    buffer = _narrow_console(monkeypatch)
    hf = "/home/someone/.cache/huggingface/hub/models--Qwen--Qwen2-VL-2B-Instruct"
    ms = "/home/someone/.cache/modelscope/hub/models/qwen/Qwen2-VL-72B-Instruct-GPTQ-Int8"
    rows = [["2B pytorch", "hf", "Qwen/Qwen2-VL-2B-Instruct", "895c3a49bc3f", "complete", "4.4 GB", hf],
            ["72B gptq Int8", "ms", "qwen/Qwen2-VL-72B-Instruct-GPTQ-Int8", "3b5c9d0d6ae1", "complete", "71.2 GB", ms]]
    render.table(["spec", "hub", "repo", "revision", "state", "size", "path"], rows, fold_constant=True)
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for cell in ("2B pytorch", "72B gptq Int8", "4.4 GB", "71.2 GB", "895c3a49bc3f"):
        assert cell in text, cell
    body = [line.split() for line in text.splitlines()[3:] if line.strip() and not line.startswith("on every")]
    path_column = "".join(words[-1] for words in body)  # the last column, folded over a few lines
    assert hf + ms == path_column
    assert text.rstrip().endswith("on every row: state complete")
