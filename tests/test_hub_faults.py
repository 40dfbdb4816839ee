"""Downloads meeting a full disk, and remove-cache meeting a running download (loopback hub)."""

from __future__ import annotations

import errno

import pytest
from hubfixtures import HF_ID, PIN, SHARD1, model_repo, same_bytes, server  # noqa: F401

from qwenvl_cli import errors
from qwenvl_cli.catalogue import resolve as resolution
from qwenvl_cli.hub import download as hub
from qwenvl_cli.hub import layout

ROOM = 1000  # bytes of SHARD1 that fit before the disk is "full"


def _fill_the_disk_during(monkeypatch, name: str) -> None:
    """huggingface_hub's real http_get, writing into a file whose disk fills up after ROOM bytes."""
    from huggingface_hub import file_download

    real = file_download.http_get

    class FullDisk:
        def __init__(self, out):
            self.out, self.written = out, 0

        def write(self, data):
            room = ROOM - self.written
            if len(data) > room:
                self.out.write(data[:room])
                self.written += room
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.out.write(data)

        def __getattr__(self, attr):
            return getattr(self.out, attr)

    def http_get(url, temp_file, *args, **kwargs):
        if kwargs.get("displayed_filename") == name:
            temp_file = FullDisk(temp_file)
        return real(url, temp_file, *args, **kwargs)

    monkeypatch.setattr(file_download, "http_get", http_get)


def test_a_disk_filling_up_mid_download_is_one_line_and_the_partial_file_resumes(server, model_repo, monkeypatch):
    spec = resolution.resolve(size_in_billions="2", hub="huggingface")
    with monkeypatch.context() as patch:
        _fill_the_disk_during(patch, SHARD1)
        with pytest.raises(errors.NotEnoughDisk) as info:
            hub.ensure_local(spec, quiet=True)
    message = info.value.message
    assert "filled up" in message and "mounted at /" in message and "more is needed" in message
    assert "resume" in info.value.hint
    partials = list((layout.hf_repo_dir(HF_ID) / "blobs").glob("*.incomplete"))
    assert [p.stat().st_size for p in partials] == [ROOM]  # kept for the resume
    server.reset_requests()
    model = hub.ensure_local(spec, quiet=True)
    ranges = [r.headers.get("range") for r in server.file_requests(SHARD1, "GET")]
    assert ranges == [f"bytes={ROOM}-"]
    assert same_bytes(model.path, model_repo)


def test_remove_cache_refuses_a_model_that_another_process_downloads(server, model_repo, tmp_path, qvl):
    from hubfixtures import spawn_qvl, wait_for

    server.fault("stall", SHARD1, times=1, after=100_000)
    proc = spawn_qvl("download", "-s", "2", "--download-hub", "huggingface", stderr_path=tmp_path / "err")
    try:
        wait_for(server.stalled.is_set, what="the download to start")
        removed = qvl("remove-cache", "-s", "2", "--download-hub", "huggingface", "--yes")
        assert removed.returncode == 1, removed.stderr
        assert "is being downloaded by another qvl process" in removed.stderr
        assert "unexpected" not in removed.stderr and "Traceback" not in removed.stderr
    finally:
        server.release.set()
    assert proc.wait(timeout=60) == 0, (tmp_path / "err").read_text()
    assert same_bytes(layout.hf_repo_dir(HF_ID) / "snapshots" / PIN, model_repo)  # nothing deleted under it
    removed = qvl("remove-cache", "-s", "2", "--download-hub", "huggingface", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert not (layout.hf_repo_dir(HF_ID) / "snapshots" / PIN).exists()
