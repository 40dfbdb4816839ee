"""Where qvl was installed from, so that an install hint names a command that works there.

A source checkout (``pip install -c constraints.txt .``, an editable install, or PYTHONPATH)
installs extras with the README's ``pip install -c constraints.txt -c constraints-quant.txt
".[quant]"`` run in the checkout; a wheel or PyPI install with ``pip install "qvl[awq]"``.
Ground floor: no qvl imports, nothing heavy (package metadata only).
"""

from __future__ import annotations

from pathlib import Path
def checkout_root() -> Path | None:
    """The source checkout qvl runs from or was installed from, else None (a wheel, PyPI).

    Running from the tree itself (PYTHONPATH, an editable install): the folder above the
    package, when it holds qvl's pyproject.toml. Installed with ``pip install .``: the folder
    named by the distribution's ``direct_url.json`` (PEP 610), when it still holds one.
    """
    here = Path(__file__).resolve().parents[1]
    if _is_checkout(here):
        return here
    import importlib.metadata

    try:
        text = importlib.metadata.distribution("qvl").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    folder = checkout_from_direct_url(text)
    return folder if folder is not None and _is_checkout(folder) else None


def checkout_from_direct_url(text: str | None) -> Path | None:
    """The local folder a PEP 610 ``direct_url.json`` names (dir_info), else None."""
    import json
    from urllib.parse import unquote, urlsplit

    try:
        data = json.loads(text or "")
    except ValueError:
        return None
    url = urlsplit(str(data.get("url", ""))) if isinstance(data, dict) else None
    if url is None or url.scheme != "file" or "dir_info" not in data:
        return None
    return Path(unquote(url.path))


def _is_checkout(folder: Path) -> bool:
    pyproject = folder / "pyproject.toml"
    try:
        return (folder / "constraints.txt").is_file() and 'name = "qvl"' in pyproject.read_text()
    except OSError:
        return False


def quant_install_command(model_format: str, upgrade: bool = False) -> str:
    """The command that installs a quantized format's backend from where qvl came from."""
    up = "-U " if upgrade else ""
    root = checkout_root()
    if root is not None:
        import shlex

        return f'cd {shlex.quote(str(root))} && pip install {up}-c constraints.txt -c constraints-quant.txt ".[quant]"'
    return f'pip install {up}"qvl[{model_format.lower()}]"'
