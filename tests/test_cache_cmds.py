"""The download, cached, verify, remove-cache and list-specs commands, run as real processes."""

from __future__ import annotations

import json
import re
import shutil
import sys

from hubfixtures import HF_ID, MS_ID, NEEDED, PIN, SHARD1, SHARD2, model_repo, same_bytes, server  # noqa: F401

from qwenvl_cli import errors
from qwenvl_cli.hub import download as hub
from qwenvl_cli.hub import layout
from qwenvl_cli.hub.progress import human_bytes
from qwenvl_cli import settings
from qwenvl_cli.catalogue.resolve import resolve
def fetch(hub_name: str, **kw):
    return hub.ensure_local(resolve(size_in_billions="2", hub=hub_name), quiet=True, **kw)


def cached(qvl) -> list[dict]:
    result = qvl("cached", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- acceptance -----------------------------------------------------------------------------


def test_download_from_a_huggingface_mirror_then_cached(server, model_repo, qvl):
    result = qvl("download", "-s", "2")  # HF_ENDPOINT points at the loopback hub
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert path.endswith(f"models--Qwen--Qwen2-VL-2B-Instruct/snapshots/{PIN}")
    assert "from Hugging Face" in result.stderr
    assert f"{HF_ID}: 100% 1.5 MB of 1.5 MB" in result.stderr  # plain progress lines: stderr is no terminal

    [entry] = cached(qvl)
    assert entry["state"] == "complete" and entry["complete"] is True
    assert (entry["hub"], entry["repo_id"], entry["revision"], entry["path"]) == ("huggingface", HF_ID, PIN, path)
    assert (entry["model_format"], entry["size_in_billions"], entry["quantization"]) == ("pytorch", "2", "none")
    assert entry["size_on_disk"] == sum((model_repo / n).stat().st_size for n in NEEDED)


def test_download_from_modelscope_then_cached(server, model_repo, qvl):
    result = qvl("download", "-s", "2", "--download-hub", "modelscope", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["hub"] == "modelscope"
    [entry] = cached(qvl)
    assert (entry["hub"], entry["repo_id"], entry["revision"], entry["state"]) == \
        ("modelscope", MS_ID, "master", "complete")
    assert same_bytes(settings.modelscope_cache() / "models" / "qwen--Qwen2-VL-2B-Instruct" / "snapshots" / "master",
                      model_repo)


def test_quiet_download_prints_only_the_path(server, qvl):
    result = qvl("download", "-s", "2", "--quiet")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip().endswith(PIN)


def test_offline_download_of_a_missing_model_is_one_error(server, qvl):
    result = qvl("download", "-s", "7", "--offline")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error:") and "offline" in lines[0]
    assert server.requests == []


def test_acceptance_with_the_tiny_checkpoint(tiny_model, monkeypatch, qvl):
    import subprocess

    from conftest import qvl_env
    from hubserver import HubServer

    hub_server = HubServer().start()
    try:
        hub_server.add_repo(tiny_model, hf_id=HF_ID, ms_id=MS_ID, hf_commit=PIN)
        monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub_server.url)
        assert qvl("download", "-s", "2").returncode == 0
        assert qvl("download", "-s", "2", "--download-hub", "modelscope").returncode == 0
    finally:
        hub_server.stop()
    entries = cached(qvl)
    assert [(e["hub"], e["repo_id"], e["state"]) for e in entries] == \
        [("huggingface", HF_ID, "complete"), ("modelscope", MS_ID, "complete")]
    # transformers finds qvl's download in the Hugging Face cache by repo id, offline
    code = ("from transformers import AutoConfig; "
            f"print(AutoConfig.from_pretrained({HF_ID!r}, revision={PIN!r}).model_type)")
    loaded = subprocess.run([sys.executable, "-c", code], env=qvl_env({"HF_HUB_OFFLINE": "1"}),
                            capture_output=True, text=True, timeout=120)
    assert loaded.stdout.strip() == "qwen2_vl", loaded.stderr[-2000:]


# --- cached / remove-cache ----------------------------------------------------------------


def test_cached_lists_nothing_on_a_fresh_machine(qvl):
    assert cached(qvl) == []
    assert "no cached models" in qvl("cached").stderr


def test_remove_cache_previews_asks_then_deletes(server, qvl):
    hf_path, ms_path = fetch("huggingface").path, fetch("modelscope").path
    table = qvl("cached").stdout
    # two rows (hf, ms); what they share is said once below the table
    assert "qwen/Qwen2-VL-2B-Instruct" in table and "Qwen/Qwen2-VL-2B-Instruct" in table
    assert "on every row: spec 2B pytorch, state complete" in table

    dry = qvl("remove-cache", "-s", "2", "--dry-run")
    assert dry.returncode == 0 and "to delete: 3.0 MB" in dry.stdout
    assert hf_path.is_dir() and ms_path.is_dir()

    refused = qvl("remove-cache", "-s", "2", "--download-hub", "modelscope", input="n\n")
    assert refused.returncode == 1 and "nothing deleted" in refused.stderr and ms_path.is_dir()

    done = qvl("remove-cache", "-s", "2", "--download-hub", "modelscope", input="y\n")
    assert done.returncode == 0 and "freed 1.5 MB" in done.stderr
    assert not layout.ms_repo_dir(MS_ID).exists() and hf_path.is_dir()
    assert [e["hub"] for e in cached(qvl)] == ["huggingface"]
    assert layout.read_manifest("modelscope", MS_ID, "master") is None


def test_remove_cache_keeps_files_shared_with_another_revision(server, model_repo, tmp_path, qvl):
    newer = tmp_path / "newer"
    shutil.copytree(model_repo, newer)
    (newer / "config.json").write_text('{"architectures": ["Qwen2VLForConditionalGeneration"], "v": 2}')
    other = "1" * 40
    server.add_repo(newer, hf_id=HF_ID, hf_commit=other)
    old = fetch("huggingface")
    new = fetch("huggingface", revision=other)
    assert old.path != new.path

    result = qvl("remove-cache", "-s", "2", "--download-hub", "huggingface", "--revision", PIN, "--yes", "--json")
    assert result.returncode == 0, result.stderr
    [item] = json.loads(result.stdout)["items"]
    assert item["commit"] == PIN and SHARD1 not in str(item["delete"])
    assert item["freed"] == (model_repo / "config.json").stat().st_size  # only its own config blob
    assert set(item["kept_shared"]) == NEEDED - {"config.json"}
    assert not old.path.exists()
    assert same_bytes(new.path, newer)  # the other revision still has every file
    assert qvl("verify", "-s", "2", "--download-hub", "huggingface").returncode == 0


def test_remove_cache_all_partial(server, qvl):
    server.fault("corrupt", SHARD2, times=None)
    try:
        fetch("huggingface")
    except errors.ChecksumMismatch:
        pass
    server.clear_faults()
    ms_path = fetch("modelscope").path
    assert [(e["hub"], e["state"]) for e in cached(qvl)] == [("huggingface", "partial"), ("modelscope", "complete")]

    result = qvl("remove-cache", "--all-partial", "--yes")
    assert result.returncode == 0, result.stderr
    assert not layout.hf_repo_dir(HF_ID).exists() and ms_path.is_dir()
    assert not (settings.hf_hub_cache() / ".locks" / layout.hf_repo_dir(HF_ID).name).exists()


def test_remove_cache_needs_a_target(qvl):
    result = qvl("remove-cache")
    assert result.returncode == 2 and "--all-partial" in result.stderr


# --- verify ---------------------------------------------------------------------------------


def test_verify_detects_a_flipped_byte_and_download_repairs_it(server, model_repo, qvl):
    model = fetch("huggingface")
    assert qvl("verify", "-s", "2", "--download-hub", "huggingface").returncode == 0
    blob = (model.path / SHARD1).resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))

    result = qvl("verify", "-s", "2", "--download-hub", "huggingface")
    assert result.returncode == 1
    assert f"{SHARD1}: sha256" in result.stdout and "1 bad" in result.stdout
    assert result.stderr.startswith("error: 1 file(s) do not match")
    assert layout.local_copy("huggingface", HF_ID, PIN).state != "complete"

    server.reset_requests()
    again = qvl("download", "-s", "2", "--download-hub", "huggingface")
    assert again.returncode == 0, again.stderr
    # what it says it fetches is the bad file, and the progress never passes 100%
    size = human_bytes((model_repo / SHARD1).stat().st_size)
    assert f"; {size} to fetch" in again.stderr and "0 B to fetch" not in again.stderr
    assert all(int(pct) <= 100 for pct in re.findall(r"(\d+)% ", again.stderr))
    assert [r.method for r in server.file_requests(SHARD1, "GET")] == ["GET"]  # only the bad file again
    assert not server.file_requests(SHARD2, "GET")
    assert same_bytes(model.path, model_repo)
    assert qvl("verify", "-s", "2", "--download-hub", "huggingface").returncode == 0


def test_verify_reports_a_missing_file(server, qvl):
    model = fetch("modelscope")
    (model.path / "tokenizer.json").unlink()
    result = qvl("verify", "-s", "2", "--download-hub", "modelscope", "--json")
    assert result.returncode == 1
    [report] = json.loads(result.stdout)
    assert {f["path"]: f["problem"] for f in report["files"] if not f["ok"]} == {"tokenizer.json": "missing"}
    [entry] = [e for e in cached(qvl) if e["hub"] == "modelscope"]
    assert entry["state"] == "partial" and entry["missing"] == ["tokenizer.json"]  # not "unverified"


def test_verify_without_a_cached_copy(qvl):
    result = qvl("verify", "-s", "7")
    assert result.returncode == 1 and "not in the cache" in result.stderr


# --- list-specs -----------------------------------------------------------------------------

LIST_SPECS_IMPORTS = """
import json, sys
from qwenvl_cli.cli.app import main
try:
    main(["list-specs", "--json"])
except SystemExit:
    pass
heavy = ("torch", "transformers", "huggingface_hub", "modelscope", "modelscope_hub", "httpx2", "requests")
sys.stderr.write(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


def test_list_specs_shows_what_is_cached_from_local_files_only(server, qvl):
    import subprocess

    from conftest import qvl_env

    fetch("huggingface")
    server.stop()  # no network needed
    result = subprocess.run([sys.executable, "-c", LIST_SPECS_IMPORTS], env=qvl_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert json.loads(result.stderr) == []  # no hub SDK, no torch
    rows = json.loads(result.stdout)
    states = {(r["model_format"], r["size_in_billions"], r["quantization"]): r["cached"] for r in rows}
    assert states[("pytorch", "2", "none")] == {"huggingface": "complete", "modelscope": "absent"}
    assert all(s == {"huggingface": "absent", "modelscope": "absent"}
               for key, s in states.items() if key != ("pytorch", "2", "none"))
    table = qvl("list-specs", "-s", "2", "-f", "pytorch").stdout
    row = next(line for line in table.splitlines() if "Qwen/Qwen2-VL-2B-Instruct" in line)
    assert "cached" in table and row.split()[-1] == "hf"


# --- progress -------------------------------------------------------------------------------


def test_progress_on_a_terminal_is_a_live_display(server, qvl):
    result = qvl("download", "-s", "2", env={"TTY_COMPATIBLE": "1", "COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    assert "━" in result.stderr and "MB/s" in result.stderr and HF_ID in result.stderr
    assert "% 1.5 MB of" not in result.stderr  # not the plain lines


def test_progress_counts_a_retried_file_once():
    from qwenvl_cli.hub.progress import Progress

    bar = Progress("m", total=300, done=100)
    bar.start_file("a", 200)
    bar.advance("a", 150)
    bar.start_file("a", 200, initial=120)  # the client resumed from the 120 bytes on disk
    assert bar.done == 220
    bar.forget("a")  # thrown away after a failed check
    assert bar.done == 100


def test_cached_with_nothing_cached_says_so_without_an_empty_table():
    from conftest import run_qvl

    done = run_qvl("cached")
    assert done.returncode == 0 and done.stdout == "" and "no cached models" in done.stderr
