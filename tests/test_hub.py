"""Downloads with the real huggingface_hub and modelscope_hub clients against a loopback hub.

Fast in-process tests call qwenvl_cli.hub.download.ensure_local; the interrupt and concurrency tests
run qvl as real processes.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from hubfixtures import (HF_CHUNK, HF_ID, MS_ID, NEEDED, PIN, SHARD1, SHARD2, big_repo,  # noqa: F401
                         big_server, model_repo, same_bytes, server, spawn_qvl, wait_for)
from hubserver import refused_url

from qwenvl_cli import errors
from qwenvl_cli.hub import download as hub
from qwenvl_cli.hub import layout
from qwenvl_cli import settings
from qwenvl_cli.catalogue import resolve as resolution
from qwenvl_cli.catalogue.spec import ResolvedSpec


def resolve(hub_name: str = "huggingface", **kw) -> ResolvedSpec:
    return resolution.resolve(size_in_billions=kw.pop("size", "2"), hub=hub_name, **kw)


def file_gets(server, name: str) -> list:
    return server.file_requests(name, "GET")


# --- full downloads -----------------------------------------------------------------------


def test_download_from_huggingface_fetches_only_what_the_model_needs(server, model_repo):
    model = hub.ensure_local(resolve("huggingface"), quiet=True)

    assert model.hub == "huggingface" and model.commit == PIN and model.verified
    assert model.path == settings.hf_hub_cache() / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots" / PIN
    assert {p.name for p in model.path.iterdir()} == NEEDED
    assert same_bytes(model.path, model_repo)
    for skipped in ("README.md", "pytorch_model.bin", "demo.jpg", ".gitattributes"):
        assert not server.file_requests(skipped, "GET") and not server.file_requests(skipped, "HEAD")
    manifest = layout.read_manifest("huggingface", HF_ID, PIN)
    assert manifest["commit"] == PIN and {f["path"] for f in manifest["files"]} == NEEDED
    checks = {f["path"]: f["checked"] for f in manifest["files"]}
    assert checks[SHARD1] == "sha256" and checks["config.json"] == "git-sha1"
    assert layout.local_copy("huggingface", HF_ID, PIN).state == "complete"


def test_a_qvl_download_is_usable_by_the_hub_tools(server):
    model = hub.ensure_local(resolve("huggingface"), quiet=True)
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = str(settings.hf_hub_cache())
    assert snapshot_download(HF_ID, revision=PIN, cache_dir=cache, local_files_only=True) == str(model.path)
    assert hf_hub_download(HF_ID, "config.json", revision=PIN, cache_dir=cache, local_files_only=True) \
        == str(model.path / "config.json")

    ms_model = hub.ensure_local(resolve("modelscope"), quiet=True)
    from modelscope_hub import HubApi

    found = HubApi().download_file(MS_ID, "model", SHARD1, cache_dir=settings.modelscope_cache(),
                                   local_files_only=True)
    assert found == ms_model.path / SHARD1


def test_download_from_modelscope(server, model_repo):
    model = hub.ensure_local(resolve("modelscope"), quiet=True)

    assert model.hub == "modelscope" and model.revision == "master"
    assert model.path == settings.modelscope_cache() / "models" / "qwen--Qwen2-VL-2B-Instruct" / "snapshots" / "master"
    assert {p.name for p in model.path.iterdir()} == NEEDED
    assert same_bytes(model.path, model_repo)
    assert not server.file_requests("pytorch_model.bin") and not server.file_requests("README.md")
    manifest = layout.read_manifest("modelscope", MS_ID, "master")
    assert manifest["commit"] == model.commit and all(f["checked"] == "sha256" for f in manifest["files"])


def test_a_complete_copy_is_used_without_the_network(server):
    first = hub.ensure_local(resolve("auto"), quiet=True)
    server.reset_requests()
    assert hub.ensure_local(resolve("auto"), quiet=True).path == first.path
    assert hub.ensure_local(resolve("huggingface"), offline=True, quiet=True).path == first.path
    assert server.requests == []


def test_a_copy_fetched_by_the_hub_tool_counts_as_cached(server):
    from huggingface_hub import snapshot_download

    snapshot_download(HF_ID, revision=PIN, endpoint=server.url, cache_dir=str(settings.hf_hub_cache()))
    assert layout.local_copy("huggingface", HF_ID, PIN).state == "unverified"  # listed, not yet hashed
    server.reset_requests()

    model = hub.ensure_local(resolve("huggingface"), offline=True, quiet=True)
    assert model.verified and server.requests == []  # checked against the listing the HF client cached
    assert layout.local_copy("huggingface", HF_ID, PIN).state == "complete"


def test_a_copy_fetched_by_modelscope_is_checked_not_fetched_again(server):
    from modelscope_hub.compat.snapshot_download import snapshot_download

    snapshot_download(MS_ID, endpoint=server.url, cache_dir=str(settings.modelscope_cache()))
    assert layout.local_copy("modelscope", MS_ID, "master").state == "unverified"
    server.reset_requests()

    model = hub.ensure_local(resolve("modelscope"), quiet=True)
    assert model.verified and not file_gets(server, SHARD1)  # only the listing was asked for
    assert layout.local_copy("modelscope", MS_ID, "master").state == "complete"


# --- hub choice -----------------------------------------------------------------------------


def test_auto_falls_back_to_modelscope_when_huggingface_refuses(server, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", refused_url())
    started = time.monotonic()
    model = hub.ensure_local(resolve("auto"))
    assert model.hub == "modelscope"
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "Hugging Face" in err and "cannot be reached" in err and "ModelScope" in err


def test_auto_uses_huggingface_when_it_answers(server, capsys):
    assert hub.ensure_local(resolve("auto")).hub == "huggingface"
    assert "from Hugging Face" in capsys.readouterr().err


def test_an_unreachable_chosen_hub_is_one_clear_error(server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", refused_url())
    with pytest.raises(errors.HubUnreachable) as info:
        hub.ensure_local(resolve("huggingface"), quiet=True)
    assert "cannot reach Hugging Face" in info.value.message and "HF_ENDPOINT" in info.value.hint


def test_the_hub_comes_from_QVL_DOWNLOAD_HUB(server, monkeypatch):
    monkeypatch.setenv("QVL_DOWNLOAD_HUB", "modelscope")
    assert hub.ensure_local(resolution.resolve(size_in_billions="2"), quiet=True).hub == "modelscope"


# --- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize("hub_name", ["huggingface", "modelscope"])
def test_a_dropped_connection_is_resumed_with_a_range(big_server, big_repo, hub_name):
    big_server.fault("drop", SHARD1, times=1, after=HF_CHUNK + 100_000)
    model = hub.ensure_local(resolve(hub_name), quiet=True)
    ranges = [r.headers.get("range") for r in file_gets(big_server, SHARD1)]
    assert ranges[0] is None and len(ranges) == 2
    start = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert HF_CHUNK <= start <= HF_CHUNK + 100_000  # resumed where the bytes on disk stopped
    assert same_bytes(model.path, big_repo)


def test_an_interrupted_download_resumes_in_the_next_run(big_server, big_repo, tmp_path, qvl):
    big_server.fault("stall", SHARD1, times=1, after=HF_CHUNK + 200_000)
    blobs = settings.hf_hub_cache() / "models--Qwen--Qwen2-VL-2B-Instruct" / "blobs"
    proc = spawn_qvl("download", "-s", "2", "--download-hub", "huggingface", stderr_path=tmp_path / "err")
    snapshot = layout.hf_repo_dir(HF_ID) / "snapshots" / PIN
    wait_for(lambda: (snapshot / SHARD2).exists()
             and any(p.stat().st_size >= HF_CHUNK for p in blobs.glob("*.incomplete")),
             what="one shard done and a partial one on disk")
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=20) == 130
    big_server.clear_faults()

    listed = json.loads(qvl("cached", "--json").stdout)
    assert [e["state"] for e in listed] == ["partial"]  # never reported as cached while incomplete
    big_server.reset_requests()
    done = qvl("download", "-s", "2", "--download-hub", "huggingface")
    assert done.returncode == 0, done.stderr
    ranges = [r.headers.get("range") for r in file_gets(big_server, SHARD1)]
    assert len(ranges) == 1 and ranges[0].startswith("bytes=") and int(ranges[0][6:-1]) >= HF_CHUNK
    assert not file_gets(big_server, SHARD2)  # finished files are not fetched again
    assert same_bytes(snapshot, big_repo)


def test_a_corrupted_file_is_fetched_again_then_refused(server, model_repo):
    server.fault("corrupt", SHARD1, times=None)
    with pytest.raises(errors.ChecksumMismatch) as info:
        hub.ensure_local(resolve("huggingface"), quiet=True)
    assert SHARD1 in info.value.message and "sha256" in info.value.message
    assert len(file_gets(server, SHARD1)) == 2  # once more after the mismatch, then it stops
    snapshot = layout.hf_repo_dir(HF_ID) / "snapshots" / PIN
    assert not (snapshot / SHARD1).exists()  # the bad bytes are not kept
    assert layout.local_copy("huggingface", HF_ID, PIN).state == "partial"
    assert layout.read_manifest("huggingface", HF_ID, PIN)["complete"] is False  # the listing, not a record


def test_one_corrupted_transfer_is_repaired(server, model_repo):
    server.fault("corrupt", SHARD1, times=1)
    model = hub.ensure_local(resolve("huggingface"), quiet=True)
    assert len(file_gets(server, SHARD1)) == 2 and same_bytes(model.path, model_repo)


def test_modelscope_checksum_mismatch_is_refused(server, monkeypatch):
    import modelscope_hub._download as ms_download

    monkeypatch.setattr(ms_download, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.01)
    server.fault("corrupt", SHARD1, times=None)
    with pytest.raises(errors.ChecksumMismatch):
        hub.ensure_local(resolve("modelscope"), quiet=True)
    assert not (layout.ms_repo_dir(MS_ID) / "snapshots" / "master" / SHARD1).exists()
    assert layout.local_copy("modelscope", MS_ID, "master").state != "complete"


@pytest.mark.parametrize("hub_name", ["huggingface", "modelscope"])
def test_repo_not_found_is_not_retried(server, hub_name):
    server.hf.clear()
    server.ms.clear()
    with pytest.raises(errors.RepoNotFound) as info:
        hub.ensure_local(resolve(hub_name), quiet=True)
    assert "was not found" in info.value.message
    listings = [r for r in server.requests if r.method == "GET" and "Acceleration" not in r.path]
    assert len(listings) == 1 and listings[0].status == 404


def test_an_unknown_revision_is_named(server):
    with pytest.raises(errors.RepoNotFound) as info:
        hub.ensure_local(resolve("huggingface"), revision="v9", quiet=True)
    assert "no revision 'v9'" in info.value.message


def test_a_gated_repo_needs_a_token(server, qvl):
    server.gated.add(HF_ID)
    result = qvl("download", "-s", "2", "--download-hub", "huggingface", "--quiet")
    assert result.returncode == 1
    assert f"{HF_ID} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr
    heads = [r for r in server.requests if r.method == "HEAD" and "/resolve/" in r.path]
    assert 0 < len(heads) <= settings.download_workers()  # no retries of a 401


def test_transient_errors_are_retried_with_backoff(server, model_repo):
    server.fault("status", "*/resolve/*/" + SHARD1, times=2, status=500, method="GET")
    server.fault("status", "/api/v1/models/*/repo/files", times=1, status=503)
    model = hub.ensure_local(resolve("huggingface"), quiet=True)
    assert len(file_gets(server, SHARD1)) == 3 and same_bytes(model.path, model_repo)
    hub.ensure_local(resolve("modelscope"), quiet=True)


def test_retries_are_bounded(server, monkeypatch):
    monkeypatch.setenv("QVL_DOWNLOAD_ATTEMPTS", "3")
    server.fault("status", "*/resolve/*/" + SHARD1, times=None, status=500, method="GET")
    with pytest.raises(errors.DownloadError) as info:
        hub.ensure_local(resolve("huggingface"), quiet=True)
    assert "HTTP 500" in info.value.message
    assert len(file_gets(server, SHARD1)) == 3


# --- offline, disk space, concurrency --------------------------------------------------


def test_offline_without_a_cached_copy(server, monkeypatch):
    with pytest.raises(errors.NotCached) as info:
        hub.ensure_local(resolve("auto"), offline=True, quiet=True)
    assert "offline" in info.value.message and "qvl download" in info.value.hint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.NotCached):
        hub.ensure_local(resolve("huggingface"), quiet=True)
    assert server.requests == []


def test_offline_with_a_cached_copy(server, monkeypatch):
    path = hub.ensure_local(resolve("modelscope"), quiet=True).path
    server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.ensure_local(resolve("auto"), quiet=True).path == path


def test_offline_with_a_partial_copy(server):
    server.fault("corrupt", SHARD2, times=None)
    with pytest.raises(errors.ChecksumMismatch):
        hub.ensure_local(resolve("huggingface"), quiet=True)
    with pytest.raises(errors.NotCached) as info:
        hub.ensure_local(resolve("huggingface"), offline=True, quiet=True)
    assert "only partly" in info.value.message


def test_not_enough_disk_space(server, monkeypatch):
    monkeypatch.setenv("QVL_TEST_FREE_BYTES", "1000000")
    with pytest.raises(errors.NotEnoughDisk) as info:
        hub.ensure_local(resolve("huggingface"), quiet=True)
    assert "1.5 MB" in info.value.message and "1.0 MB" in info.value.message
    assert not [r for r in server.requests if "/resolve/" in r.path]  # nothing fetched


def test_two_concurrent_downloads_do_not_collide(server, model_repo, tmp_path):
    server.fault("stall", SHARD1, times=1, after=100_000)
    first = spawn_qvl("download", "-s", "2", "--download-hub", "huggingface", stderr_path=tmp_path / "a")
    wait_for(server.stalled.is_set, what="the first download to start")
    second = spawn_qvl("download", "-s", "2", "--download-hub", "huggingface", stderr_path=tmp_path / "b")
    wait_for(lambda: "another qvl process is downloading" in (tmp_path / "b").read_text(),
             what="the second download to wait")
    server.release.set()
    out1, _ = first.communicate(timeout=60)
    out2, _ = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, (tmp_path / "a").read_text()
    assert out1 == out2 and out1.strip().endswith(PIN)
    assert len(file_gets(server, SHARD1)) == 1 and len(file_gets(server, SHARD2)) == 1
    assert same_bytes(layout.hf_repo_dir(HF_ID) / "snapshots" / PIN, model_repo)


# --- --model-path and file selection ----------------------------------------------------


def test_model_path_is_used_as_it_is(model_repo, tmp_path):
    assert hub.local_model_from_path(model_repo).path == model_repo.resolve()
    with pytest.raises(errors.InvalidModelPath, match="does not exist"):
        hub.local_model_from_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.InvalidModelPath, match="no config.json"):
        hub.local_model_from_path(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json", SHARD1):
        (broken / name).write_bytes((model_repo / name).read_bytes())
    with pytest.raises(errors.InvalidModelPath, match=SHARD2):
        hub.local_model_from_path(broken)


def test_needed_files():
    listing = ["config.json", "README.md", "model.safetensors", "pytorch_model.bin", "demo.png",
               "merges.txt", "chat_template.jinja", "onnx/model.json", "LICENSE"]
    assert layout.needed_files(listing) == ["config.json", "model.safetensors", "merges.txt",
                                            "chat_template.jinja"]
    assert "pytorch_model.bin" in layout.needed_files(["config.json", "pytorch_model.bin"])
