"""What a quantized spec (AWQ Int4, GPTQ Int4/Int8) needs installed, checked before a download.

transformers 5.x loads AWQ through ``gptqmodel`` and GPTQ through ``optimum`` + ``gptqmodel``.
:func:`require_backend` checks, before anything is downloaded or imported, that those packages
are there (``importlib.util.find_spec`` and package metadata only: nothing heavy is imported)
and, when the model is to run on CPU, that the installed ``gptqmodel`` has CPU kernels for the
format. It raises :class:`MissingDependency` naming the install command.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qwenvl_cli import install
from qwenvl_cli.errors import EngineError, MissingDependency

FORMATS = ("awq", "gptq")
# The import names transformers needs for each format (the pip names are the same).
REQUIRED = {"awq": ("gptqmodel",), "gptq": ("optimum", "gptqmodel")}
# gptqmodel's pure-torch kernels, which run on CPU (looked up as files: no import).
CPU_KERNELS = {"awq": "nn_modules/qlinear/torch_awq.py", "gptq": "nn_modules/qlinear/torch.py"}
# ...and the names that select them. Left to choose on CPU, gptqmodel picks its AVX512-BF16
# kernel where the CPU has it, which first builds a C++ extension: 4 minutes on 2 cores.
CPU_BACKENDS = {"awq": "torch_awq", "gptq": "gptq_torch"}
TESTED = "gptqmodel 7.7, optimum 2.3"


def install_command(model_format: str, upgrade: bool = False) -> str:
    """What installs the backend, from where qvl was installed: a checkout -> the README's
    `pip install -c constraints.txt -c constraints-quant.txt ".[quant]"` run there; a wheel or
    PyPI -> `pip install "qvl[awq]"` (see qwenvl_cli.install)."""
    return install.quant_install_command(model_format, upgrade)


# What --cluster needs (the qvl[ray] extra): Ray itself, Ray Data's pyarrow, Ray Serve's
# aiohttp; looked up as top-level modules, so nothing is imported.
RAY_MODULES = ("ray", "pyarrow", "aiohttp")


def require_ray() -> None:
    """Stop with one line naming the install command when Ray (Serve and Data) is missing:
    the first check of every ``--cluster`` command, before anything is resolved or read."""
    missing = [name for name in RAY_MODULES if not _installed(name)]
    if missing:
        raise MissingDependency(f"--cluster runs on Ray, and {missing[0]} is not installed: "
                                f'pip install "qvl[ray]"',
                                "install it on this machine and on every node of the cluster "
                                "(the same versions of Ray and qvl everywhere; see docs/cluster.md)")


def _installed(name: str) -> bool:
    """A real package, not a namespace package made of a folder that happens to have its name
    (Ray's own temporary folder /tmp/ray, when qvl runs in /tmp)."""
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None


def is_quantized(model_format: str | None) -> bool:
    return bool(model_format) and model_format.lower() in FORMATS


@dataclass(frozen=True)
class QuantBackend:
    """What is installed for one format, and whether it can run on CPU."""

    model_format: str
    versions: dict[str, str]
    cpu: bool  # the installed gptqmodel has CPU kernels for this format
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        packages = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        where = "CUDA GPUs and CPU" if self.cpu else "CUDA GPUs only"
        return f"{self.model_format.upper()} backend: {packages} (runs on {where})"


def require_backend(model_format: str, device: str = "auto") -> QuantBackend | None:
    """Check that the packages for ``model_format`` are importable; None for unquantized formats.

    ``device`` is where the model will run: ``cuda``, ``cpu``, or ``auto`` (then the GPUs are
    probed without torch, see :mod:`qwenvl_cli.fit.gpus`). On CPU the installed backend must have CPU
    kernels for the format; otherwise this stops with a one-line reason.
    """
    fmt = (model_format or "").lower()
    if fmt not in FORMATS:
        return None
    missing = [name for name in REQUIRED[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        names = " and ".join(missing)
        raise MissingDependency(
            f"{fmt.upper()} checkpoints need {names}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: {install_command(fmt)}",
            f"{_both_hint()} (tested: {TESTED})")
    versions = {name: _version(name) for name in REQUIRED[fmt]}
    cpu = _has_cpu_kernel(fmt)
    on_cpu = _runs_on_cpu(device)
    notes: list[str] = []
    if on_cpu and not cpu:
        raise EngineError(
            f"the installed gptqmodel {versions['gptqmodel']} has no CPU kernel for {fmt.upper()}: "
            f"it runs on CUDA GPUs only",
            f"upgrade it (`{install_command(fmt, upgrade=True)}`: gptqmodel 7.7 runs AWQ and GPTQ on CPU), "
            "or run on a CUDA GPU (--device cuda)")
    if on_cpu:
        notes.append(f"{fmt.upper()} on CPU runs gptqmodel's torch kernels: it works, but is far "
                     "slower than on a GPU")
    return QuantBackend(fmt, versions, cpu, tuple(notes))


def _both_hint() -> str:
    if install.checkout_root() is not None:
        return "the [quant] extra installs the backends of both AWQ and GPTQ"
    return '`pip install "qvl[quant]"` installs the backends of both AWQ and GPTQ'


def _runs_on_cpu(device: str) -> bool:
    device = (device or "auto").lower()
    if device in ("cpu", "cuda"):
        return device == "cpu"
    from qwenvl_cli.fit import gpus  # auto: ask the driver, not torch

    return not gpus.query().visible  # no driver to ask (unknown) means no usable GPU either


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _has_cpu_kernel(fmt: str) -> bool:
    spec = importlib.util.find_spec("gptqmodel")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return any((Path(root) / CPU_KERNELS[fmt]).is_file() for root in roots)
