"""The GPU probe: NVML, then nvidia-smi, then unknown; CUDA_VISIBLE_DEVICES and --gpu-idx.

No test here touches a real GPU: NVML is replaced by a fake module, nvidia-smi by a script
on PATH, and QVL_FAKE_GPUS simulates whole machines.
"""

from __future__ import annotations

import os
import sys
import types

import pytest

from qwenvl_cli.fit import gpus
from qwenvl_cli.errors import UsageError
from qwenvl_cli.fit.gpus import GiB, MiB


@pytest.fixture
def no_probe(monkeypatch, tmp_path):
    """No simulated GPUs, no NVML, an empty PATH: each test adds the source it wants."""
    monkeypatch.delenv(gpus.FAKE_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    return bindir


def _fake_nvml(devices, fail_init=None):
    """A stand-in for nvidia-ml-py with the same functions qvl calls."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    state = {"shutdown": 0}

    def init():
        if fail_init:
            raise NVMLError(fail_init)

    mod.NVMLError = NVMLError
    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    mod.nvmlDeviceGetName = lambda h: h["name"]
    mod.nvmlDeviceGetUUID = lambda h: h["uuid"]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h["total"], free=h["free"],
                                                                 used=h["total"] - h["free"])
    mod.state = state
    return mod


def _smi_script(bindir, body: str, code: int = 0) -> None:
    script = bindir / "nvidia-smi"  # shell builtins only: PATH holds nothing else in these tests
    lines = " ".join("'" + line.replace("'", "'\\''") + "'" for line in body.splitlines())
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' {lines}\nexit {code}\n")
    script.chmod(0o755)


def test_nvml_is_the_first_source(no_probe, monkeypatch):
    fake = _fake_nvml([
        {"name": b"NVIDIA A100-SXM4-80GB", "uuid": "GPU-aaaa", "total": 80 * GiB, "free": 75 * GiB},
        {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-bbbb", "total": 80 * GiB, "free": 1 * GiB},
    ])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _smi_script(no_probe, "0, GPU-zzzz, 1, 1, not used")
    report = gpus.query()
    assert report.source == "nvml" and report.known
    assert [(g.name, g.uuid, g.total, g.free) for g in report.gpus] == [
        ("NVIDIA A100-SXM4-80GB", "GPU-aaaa", 80 * GiB, 75 * GiB),
        ("NVIDIA A100-SXM4-80GB", "GPU-bbbb", 80 * GiB, 1 * GiB)]
    assert fake.state["shutdown"] == 1
    assert "GPU 0 (NVIDIA A100-SXM4-80GB): 75.0 of 80.0 GiB free" in report.describe()


def test_nvidia_smi_when_nvml_fails(no_probe, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([], fail_init="Driver Not Loaded"))
    _smi_script(no_probe, "0, GPU-1111-aaaa, 24564, 12083, NVIDIA GeForce RTX 4090\n"
                          "1, GPU-2222-bbbb, [N/A], [N/A], NVIDIA A100, MIG 3g.40gb")
    report = gpus.query()
    assert report.source == "nvidia-smi"
    first, second = report.gpus
    assert (first.index, first.name, first.total, first.free) == (0, "NVIDIA GeForce RTX 4090",
                                                                   24564 * MiB, 12083 * MiB)
    assert second.name == "NVIDIA A100, MIG 3g.40gb" and second.free is None
    assert report.notes == ("NVML: Driver Not Loaded",)


def test_nvidia_smi_query_is_the_documented_one(no_probe, tmp_path):
    log = tmp_path / "args"
    script = no_probe / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {log}\necho '0, GPU-1, 1024, 512, X'\n")  # builtins
    script.chmod(0o755)
    assert gpus.query().gpus[0].free == 512 * MiB
    assert log.read_text().split() == gpus.NVIDIA_SMI_QUERY


def test_unknown_when_nothing_answers(no_probe):
    report = gpus.query()
    assert not report.known and report.gpus == ()
    assert report.notes == ("NVML: nvidia-ml-py is not installed", "nvidia-smi: not found on PATH")
    assert report.describe().startswith("unknown (NVML")
    _smi_script(no_probe, "NVIDIA-SMI has failed because it couldn't communicate with the driver", code=9)
    report = gpus.query()
    assert not report.known and "nvidia-smi: exit 9: NVIDIA-SMI has failed" in report.notes[1]


def test_fake_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(gpus.FAKE_ENV, "80GiB:75GiB, 24GB, 81920MiB:?, 16")
    report = gpus.query()
    assert report.source == gpus.FAKE_ENV
    assert [(g.total, g.free) for g in report.gpus] == [
        (80 * GiB, 75 * GiB), (24 * 10 ** 9, 24 * 10 ** 9), (80 * GiB, None), (16 * GiB, 16 * GiB)]
    monkeypatch.setenv(gpus.FAKE_ENV, "none")
    assert gpus.query().known and gpus.query().gpus == ()
    monkeypatch.setenv(gpus.FAKE_ENV, "unknown")
    assert not gpus.query().known


@pytest.mark.parametrize("value,problem", [("24XB", "cannot read"), ("8:16", "more free than total"),
                                          ("8:4:2", "is not TOTAL or TOTAL:FREE")])
def test_fake_gpus_errors(monkeypatch, value, problem):
    monkeypatch.setenv(gpus.FAKE_ENV, value)
    with pytest.raises(UsageError, match=problem):
        gpus.query()


@pytest.mark.parametrize("visible,expected", [
    (None, [0, 1, 2, 3]),
    ("2,0", [2, 0]),          # CUDA renumbers: cuda:0 is the physical GPU 2
    ("", []),
    ("-1", []),
    ("1,7,2", [1]),           # an entry naming no device ends the list
    ("1,1", [1]),             # and so does a repeated one
    ("GPU-00000003", [3]),    # UUIDs, and unique prefixes of them
    ("GPU-0000000", []),      # an ambiguous prefix names no device
    (" 3 , GPU-00000001-0000-4000-8000-00000000fa4e", [3, 1]),
    ("MIG-abc", []),
])
def test_cuda_visible_devices(monkeypatch, visible, expected):
    monkeypatch.setenv(gpus.FAKE_ENV, "10,20,30,40")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    report = gpus.query()
    assert [g.physical_index for g in report.visible] == expected
    assert [g.index for g in report.visible] == list(range(len(expected)))


def test_gpu_idx_counts_the_visible_gpus(monkeypatch):
    monkeypatch.setenv(gpus.FAKE_ENV, "10,20,30,40")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    report = gpus.query("1")
    assert [(g.index, g.physical_index, g.total) for g in report.gpus] == [(1, 3, 40 * GiB)]
    assert len(report.visible) == 2
    assert [g.index for g in gpus.query("1,0").gpus] == [1, 0]
    with pytest.raises(UsageError, match="names GPU 1 twice"):  # one parser, one rule (gpus.parse_gpu_idx)
        gpus.query("1,0,1")
    with pytest.raises(UsageError) as info:
        gpus.query("2")
    assert "there is no GPU 2; visible GPUs: 0, 1" in info.value.message
    with pytest.raises(UsageError, match="is not a GPU number"):
        gpus.query("0,x")


def test_resolve_uses_nvidia_smi_in_a_real_process(tmp_path, qvl):
    """End to end: no NVML (a pynvml that cannot start), nvidia-smi on PATH, CUDA_VISIBLE_DEVICES."""
    fake_dir = tmp_path / "fakemods"
    fake_dir.mkdir()
    (fake_dir / "pynvml.py").write_text(
        "class NVMLError(Exception):\n    pass\n\n"
        "def nvmlInit():\n    raise NVMLError('NVML Shared Library Not Found')\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _smi_script(bindir, "0, GPU-aaaa, 24564, 2000, NVIDIA GeForce RTX 4090\n"
                        "1, GPU-bbbb, 24564, 23000, NVIDIA GeForce RTX 4090")
    import qwenvl_cli

    pkg = os.path.dirname(os.path.dirname(qwenvl_cli.__file__))
    env = {"PYTHONPATH": os.pathsep.join([str(fake_dir), pkg]),
           "PATH": os.pathsep.join([str(bindir), os.environ["PATH"]]),
           "CUDA_VISIBLE_DEVICES": "GPU-bbbb"}
    env.pop(gpus.FAKE_ENV, None)
    proc = qvl("resolve", "-s", "7", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    import json

    data = json.loads(proc.stdout)
    assert data["gpus"]["source"] == "nvidia-smi"
    assert [(g["index"], g["physical_index"]) for g in data["gpus"]["gpus"]] == [(0, 1)]
    assert data["fit"]["fits"] is True and data["fit"]["gpus"] == [0]
    assert data["gpus"]["notes"] == ["NVML: NVML Shared Library Not Found"]
