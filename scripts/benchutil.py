"""What every benchmark prints about the machine it ran on (imported by scripts/bench_*.py)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine(torch: Any = None) -> str:
    """'Linux x86_64, <cpu>, 2 logical CPUs[, GPU ...]; Python 3.11.7[, torch ... (N threads)]'."""
    text = f"{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} logical CPUs"
    if torch is not None:
        text += f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    text += f"; Python {platform.python_version()}"
    if torch is not None:
        text += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return text
