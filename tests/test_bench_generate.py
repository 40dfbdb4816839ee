"""scripts/bench_generate.py: the smoke run on the CPU, and the model it builds on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, qvl_env

sys.path.insert(0, str(REPO / "scripts"))


def test_smoke_run_measures_every_path_and_client_count(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_generate.py"), "--smoke", "--new-tokens", "8",
                           "--image-tokens", "64", "--runs", "1", "--concurrency", "1,2", "--requests", "1",
                           "--json", str(out)], env=qvl_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMOKE RUN" in proc.stderr
    assert "| reference | " in proc.stdout and "| qvl static (qvl loop, static step) |" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"reference", "qvl static", "qvl generate"}
    for row in data["rows"].values():
        assert row["tokens"] == 8 and row["tok_s"] > 0 and row["ttft_ms"] > 0
        assert row["prompt_tokens"] == data["rows"]["reference"]["prompt_tokens"]  # same inputs
    assert data["rows"]["reference"]["prompt_tokens"] > 64  # the image's 64 tokens are in
    assert [c["requests"] for c in data["concurrency"].values()] == [1, 2]


@pytest.mark.parametrize("size", ["2", "7"])
def test_the_benchmark_model_has_the_published_parameter_count(size):
    import bench_setup

    assert bench_setup.count_meta_params(size) == bench_setup.PUBLISHED[size]["params"]


def test_image_has_the_asked_number_of_visual_tokens(tmp_path):
    import bench_setup

    path, width, height = bench_setup.make_image(tmp_path / "i.jpg", 1280)
    assert (width, height) == (1120, 896) and width * height // 28 // 28 == 1280 and path.exists()


@pytest.mark.parametrize("name,tbs", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H200", 4.8),
                                      ("NVIDIA H100 PCIe", 2.0), ("NVIDIA A100-SXM4-80GB", 2.039),
                                      ("NVIDIA A100-SXM4-40GB", 1.555)])
def test_bandwidth_is_looked_up_by_gpu_name(name, tbs):
    import bench_setup

    assert bench_setup.bandwidth(name, None)[0] == tbs
    assert bench_setup.bandwidth("Mystery GPU", None)[0] is None
    assert bench_setup.bandwidth(name, 9.9) == (9.9, "--bandwidth-tbs")
