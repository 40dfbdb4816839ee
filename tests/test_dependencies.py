"""Every third-party import in qwenvl_cli/ is a declared dependency (issue 14, item 1).

`pip install -c constraints.txt .` (the README's first command, no extras) must give every
module that the main install runs what it imports: the client code once needed httpx and
openai, which only the test extra installed, and `qvl chat` failed on a launched model. The
imports are read from each module's AST (lazy imports inside functions included), mapped to
their distribution with importlib.metadata, and compared with pyproject.toml.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from conftest import REPO
from test_layers import PACKAGE, imports_of, modules

# Modules whose third-party imports come from an extra rather than the main dependencies
# ("qwenvl_cli/engine/x.py": "quant"). The quantized backends need none: they are found with
# importlib.util.find_spec (fit/packages.py) and imported by transformers, not by qvl.
EXTRA_OF: dict[str, str] = {"qwenvl_cli/engine/vllm.py": "vllm", "qwenvl_cli/serve/cluster.py": "ray",
                             "qwenvl_cli/batch/cluster.py": "ray", "qwenvl_cli/batch/captions.py": "ray"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> dict[str, set[str]]:
    """{"": main dependencies, extra: its dependencies}, as normalised distribution names."""
    project = tomllib.loads(pyproject.read_text())["project"]
    name = lambda req: normalise(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])  # noqa: E731
    out = {"": {name(r) for r in project.get("dependencies", [])}}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out[extra] = {name(r) for r in reqs}
    return out


def undeclared(files: list[Path], deps: dict[str, set[str]], root: Path = PACKAGE.parent) -> list[str]:
    dists = packages_distributions()
    found = []
    for path in files:
        where = path.relative_to(root).as_posix()
        extra = EXTRA_OF.get(where, "")
        allowed = deps[""] | deps.get(extra, set())
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if not top or top == "qwenvl_cli" or top in sys.stdlib_module_names:
                continue
            owners = {normalise(d) for d in dists.get(top, [])}
            if not owners and extra and normalise(top) in deps.get(extra, set()):
                continue  # an extra's package, not installed in this environment
            if not owners:
                found.append(f"{where}:{line}: imports {top}, which no installed distribution provides")
            elif not owners & allowed:
                found.append(f"{where}:{line}: imports {top} (from {', '.join(sorted(owners))}), not declared in "
                             f"pyproject.toml's {'[' + extra + '] extra' if extra else 'dependencies'}")
    return found


def test_every_third_party_import_is_a_declared_dependency():
    assert undeclared(modules(), declared(REPO / "pyproject.toml")) == []


def probe(tmp_path: Path, pyproject: str, module: str, source: str) -> list[str]:
    """undeclared() for one made-up module (under tmp_path, never in the package) and pyproject."""
    (tmp_path / "pyproject.toml").write_text(pyproject)
    fake = tmp_path / module
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(source)
    return undeclared([fake], declared(tmp_path / "pyproject.toml"), root=tmp_path)


def test_the_check_catches_an_import_only_the_test_extra_declares(tmp_path):
    """httpx in the test extra only (the bug the README install hit) is reported, by line."""
    found = probe(tmp_path, '[project]\nname = "x"\ndependencies = ["rich>=13", "PyYAML"]\n'
                  '[project.optional-dependencies]\ntest = ["httpx>=0.27"]\n', "qwenvl_cli/backend/probe.py",
                  "import rich\nimport yaml\n\n\ndef f():\n    import httpx\n")
    assert found == ["qwenvl_cli/backend/probe.py:6: imports httpx (from httpx), not declared in "
                     "pyproject.toml's dependencies"]


def test_a_module_of_an_extra_may_import_that_extra(tmp_path, monkeypatch):
    args = (tmp_path, '[project]\nname = "x"\ndependencies = []\n[project.optional-dependencies]\nquant = ["PyYAML"]\n',
            "qwenvl_cli/engine/probe.py", "import yaml\n")
    assert len(probe(*args)) == 1
    monkeypatch.setitem(EXTRA_OF, "qwenvl_cli/engine/probe.py", "quant")
    assert probe(*args) == []
