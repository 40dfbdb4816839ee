"""Free and total memory per GPU, read without importing torch.

Sources, in order: NVML through nvidia-ml-py (``import pynvml``, imported only here, when
asked), then ``nvidia-smi --query-gpu``, then "unknown". ``CUDA_VISIBLE_DEVICES`` (indices
or UUIDs, as CUDA reads it) decides which GPUs the process sees and how they are numbered;
``--gpu-idx`` then picks among those, by the number torch gives them (``cuda:N``).

``QVL_FAKE_GPUS`` replaces the probe with simulated GPUs, for tests and for "what if"
questions (``QVL_FAKE_GPUS=24GiB qvl resolve -s auto``). Each comma-separated entry is
``TOTAL`` or ``TOTAL:FREE`` with a unit GiB, GB, MiB or MB (no unit: GiB); ``?`` as FREE
means unknown; ``none`` means no GPU, ``unknown`` means the probe found nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from typing import Any

from qwenvl_cli.errors import UsageError

GiB = 1 << 30
MiB = 1 << 20
FAKE_ENV = "QVL_FAKE_GPUS"
_UNITS = {"gib": GiB, "gb": 10 ** 9, "mib": MiB, "mb": 10 ** 6, "": GiB}


@dataclass(frozen=True)
class Gpu:
    index: int  # the number CUDA and torch give it (cuda:N), after CUDA_VISIBLE_DEVICES
    physical_index: int  # the number nvidia-smi gives it
    name: str
    uuid: str | None
    total: int | None  # bytes
    free: int | None  # bytes

    def label(self) -> str:
        return f"GPU {self.index} ({self.name})"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "physical_index": self.physical_index, "name": self.name,
                "uuid": self.uuid, "total_bytes": self.total, "free_bytes": self.free}


@dataclass(frozen=True)
class GpuReport:
    """What the probe saw: the GPUs selected for the model, among the visible ones."""

    gpus: tuple[Gpu, ...]  # selected by --gpu-idx, else every visible GPU
    visible: tuple[Gpu, ...]  # every GPU that CUDA_VISIBLE_DEVICES lets this process see
    source: str  # nvml | nvidia-smi | QVL_FAKE_GPUS | unknown
    notes: tuple[str, ...] = field(default_factory=tuple)  # why a source failed

    @property
    def known(self) -> bool:
        """False when no source could answer (then an empty list means "don't know")."""
        return self.source != "unknown"

    def describe(self) -> str:
        """One line: 'GPU 0 (NVIDIA A100): 75.0 of 80.0 GiB free', or why it is unknown."""
        if not self.known:
            return "unknown (" + "; ".join(self.notes) + ")"
        if not self.gpus:
            hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
            return "none visible" + (f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden is not None else "")
        return "; ".join(f"{g.label()}: {gib(g.free)} of {gib(g.total)} GiB free" for g in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "gpus": [g.to_dict() for g in self.gpus],
                "visible": [g.index for g in self.visible], "notes": list(self.notes)}


def gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GiB:.1f}"


# --- the probe ------------------------------------------------------------------------


def query(gpu_idx: str | None = None) -> GpuReport:
    """Probe the GPUs, apply CUDA_VISIBLE_DEVICES, then select ``gpu_idx`` ("0,1")."""
    notes: list[str] = []
    physical, source = None, "unknown"
    fake = os.environ.get(FAKE_ENV)
    if fake is not None:
        physical, source = parse_fake(fake), FAKE_ENV
        notes.append(f"simulated by {FAKE_ENV}={fake}")
    else:
        for name, probe in (("nvml", _from_nvml), ("nvidia-smi", _from_nvidia_smi)):
            physical, note = probe()
            if physical is not None:
                source = name
                break
            notes.append(note)
    if physical is None:
        return GpuReport((), (), "unknown", tuple(notes))
    visible = apply_visible_devices(physical, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return GpuReport(select(visible, gpu_idx), visible, source, tuple(notes))


def _from_nvml() -> tuple[list[Gpu] | None, str]:
    try:
        import pynvml
    except ImportError:
        return None, "NVML: nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means: try the next source
        return None, f"NVML: {exc}"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                total, free = int(mem.total), int(mem.free)
            except Exception:  # noqa: BLE001 - e.g. not supported on a MIG parent
                total = free = None
            out.append(Gpu(i, i, _text(pynvml.nvmlDeviceGetName(handle)),
                           _text(pynvml.nvmlDeviceGetUUID(handle)), total, free))
        return out, ""
    except Exception as exc:  # noqa: BLE001
        return None, f"NVML: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - shutting down a half-open NVML is best effort
            pass


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


NVIDIA_SMI_QUERY = ["--query-gpu=index,uuid,memory.total,memory.free,name",
                    "--format=csv,noheader,nounits"]


def _from_nvidia_smi() -> tuple[list[Gpu] | None, str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi: not found on PATH"
    try:
        proc = subprocess.run([exe, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-smi: {exc}"
    if proc.returncode != 0:
        first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
        return None, f"nvidia-smi: exit {proc.returncode}" + (f": {first[0]}" if first else "")
    try:
        return [_smi_line(line) for line in proc.stdout.splitlines() if line.strip()], ""
    except ValueError as exc:
        return None, f"nvidia-smi: unexpected output: {exc}"


def _smi_line(line: str) -> Gpu:
    index, uuid, total, free, name = (p.strip() for p in line.split(",", 4))

    def mib(value: str) -> int | None:
        return None if value.startswith("[") else int(float(value) * MiB)  # [N/A], [Not Supported]

    return Gpu(int(index), int(index), name, uuid, mib(total), mib(free))


# --- simulation -----------------------------------------------------------------------


def parse_fake(value: str) -> list[Gpu] | None:
    """``QVL_FAKE_GPUS`` -> simulated GPUs (None for 'unknown', [] for 'none')."""
    text = value.strip().lower()
    if text == "unknown":
        return None
    if text in {"", "none", "0"}:
        return []
    out = []
    for i, entry in enumerate(value.split(",")):
        parts = entry.strip().split(":")
        if len(parts) > 2:
            raise UsageError(f"{FAKE_ENV}: {entry.strip()!r} is not TOTAL or TOTAL:FREE",
                             f"write e.g. {FAKE_ENV}=80GiB:75GiB,24GiB")
        total = _bytes(parts[0], entry)
        free = total if len(parts) == 1 else (None if parts[1].strip() == "?" else _bytes(parts[1], entry))
        if free is not None and free > total:
            raise UsageError(f"{FAKE_ENV}: {entry.strip()!r} has more free than total memory",
                             "write TOTAL:FREE with FREE <= TOTAL")
        out.append(Gpu(i, i, f"Simulated GPU {i}", f"GPU-{i:08x}-0000-4000-8000-00000000fa4e", total, free))
    return out


def _bytes(text: str, entry: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"{FAKE_ENV}: cannot read the memory size in {entry.strip()!r}",
                         "sizes look like 80GiB, 24GB, 81920MiB or 24 (GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


# --- visibility and selection ---------------------------------------------------------


def apply_visible_devices(physical: list[Gpu], value: str | None) -> tuple[Gpu, ...]:
    """The GPUs CUDA would expose for this ``CUDA_VISIBLE_DEVICES``, renumbered from 0.

    As in CUDA: unset means all; entries are indices or (prefixes of) UUIDs; an entry that
    names no device, or repeats one, ends the list (the ones after it are ignored).
    """
    if value is None:
        return tuple(physical)
    chosen: list[Gpu] = []
    for token in (t.strip() for t in value.split(",")):
        gpu = _find(physical, token)
        if gpu is None or gpu in chosen:
            break
        chosen.append(gpu)
    return tuple(replace(g, index=i) for i, g in enumerate(chosen))


def _find(physical: list[Gpu], token: str) -> Gpu | None:
    if re.fullmatch(r"\d+", token):
        return next((g for g in physical if g.physical_index == int(token)), None)
    if token.upper().startswith("GPU-"):
        matches = [g for g in physical if g.uuid and g.uuid.lower().startswith(token.lower())]
        return matches[0] if len(matches) == 1 else None
    return None  # MIG-... instances and anything else: not something this probe can size


def parse_gpu_idx(value: str | None) -> tuple[int, ...] | None:
    """``--gpu-idx`` ("0,1") -> (0, 1); None or empty stays None. The one parser of the flag:
    GPU numbers from 0, separated by commas, each at most once."""
    if value is None or not str(value).strip():
        return None
    out: list[int] = []
    for token in (t.strip() for t in str(value).split(",")):
        if not re.fullmatch(r"\d+", token):
            raise UsageError(f"--gpu-idx {value!r}: {token!r} is not a GPU number",
                             "write GPU numbers from 0 separated by commas, e.g. --gpu-idx 0,1")
        if int(token) in out:
            raise UsageError(f"--gpu-idx {value!r} names GPU {token} twice", "list each GPU once, e.g. --gpu-idx 0,1")
        out.append(int(token))
    return tuple(out)


def select(visible: tuple[Gpu, ...], gpu_idx: str | None) -> tuple[Gpu, ...]:
    """Pick ``--gpu-idx`` ("0,1") among the visible GPUs; all of them when it is None."""
    wanted = parse_gpu_idx(gpu_idx)
    if wanted is None:
        return visible
    shown = ", ".join(str(g.index) for g in visible) or "none"
    out: list[Gpu] = []
    for index in wanted:
        gpu = next((g for g in visible if g.index == index), None)
        if gpu is None:
            raise UsageError(f"--gpu-idx {gpu_idx}: there is no GPU {index}; visible GPUs: {shown}",
                             "GPU numbers count the GPUs CUDA_VISIBLE_DEVICES leaves visible, from 0")
        out.append(gpu)
    return tuple(out)
