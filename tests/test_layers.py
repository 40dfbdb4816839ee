"""The floor plan (docs/architecture.md): each wing imports only the wings below it.

Every module's imports are read from its AST, lazy imports inside functions included, so
that a rule broken inside a function body fails here too, naming the file and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwenvl_cli"
GROUND = ("errors", "settings", "messages", "generation", "render", "install", "__init__")
# Rank of each wing: a module may import its own wing and wings of a lower rank. Wings of the
# same rank (catalogue and media; fit and hub; chat and batch) do not import each other.
RANKS = {"ground": 0, "catalogue": 1, "media": 1, "fit": 2, "hub": 2, "engine": 3, "serve": 4,
         "backend": 5, "chat": 6, "batch": 6, "cli": 7}
ONLY = {  # third-party top-level packages that one wing alone may import
    "typer": {"cli"}, "click": {"cli"},
    "torch": {"engine"}, "torchvision": {"engine"}, "transformers": {"engine"}, "accelerate": {"engine"},
    "gptqmodel": {"engine"}, "optimum": {"engine"}, "qwen_vl_utils": {"engine"},
    "vllm": {"engine"}, "ray": {"engine", "serve", "batch"},
    "xgrammar": {"engine"}, "prometheus_client": {"serve"},
}


def wing_of(module: str) -> str:
    """'qwenvl_cli.hub.cache' -> 'hub'; ground-floor modules -> 'ground'."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in GROUND or parts[1] == "__main__":
        return "ground" if len(parts) == 1 or parts[1] != "__main__" else "main"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth. ``from X import y``
    counts as X.y where X.y is a module of ours, else X."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module_name(path).split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*full.split("."))).with_suffix(".py").is_file() or \
                    (PACKAGE.parent / Path(*full.split(".")) / "__init__.py").is_file()
                out.append((node.lineno, full if is_module else mod))
    return out


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def problems(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        me = module_name(path)
        mine = wing_of(me)
        where = path.relative_to(PACKAGE.parent)
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if top == "qwenvl_cli":
                theirs = wing_of(target)
                if mine == "main" or theirs == mine:
                    continue
                if theirs == "cli":
                    found.append(f"{where}:{line}: imports {target}: nothing imports cli/")
                elif theirs != "main" and RANKS[theirs] >= RANKS[mine]:
                    found.append(f"{where}:{line}: imports {target}: {mine}/ may import only the wings below it")
            elif top in ONLY and mine not in ONLY[top]:
                found.append(f"{where}:{line}: imports {target}: only {', '.join(sorted(ONLY[top]))}/ may import {top}")
    return found


def cycles(files: list[Path]) -> list[list[str]]:
    """Import cycles between modules (module-level and lazy imports alike)."""
    names = {module_name(p) for p in files}
    graph = {module_name(p): {t for _, t in imports_of(p) if t in names and t != module_name(p)} for p in files}
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_wing_imports_only_the_wings_below_it():
    assert problems(modules()) == []


def test_there_are_no_import_cycles():
    assert cycles(modules()) == []


def test_every_module_is_in_a_wing():
    for path in modules():
        me = module_name(path)
        assert wing_of(me) in RANKS or wing_of(me) == "main", me


@pytest.mark.parametrize("snippet,expected", [
    ("from qwenvl_cli.cli import app\n", "nothing imports cli/"),
    ("def f():\n    from qwenvl_cli.serve import server\n", "hub/ may import only the wings below it"),
    ("def f():\n    import torch\n", "only engine/ may import torch"),
    ("import typer\n", "only cli/ may import typer"),
    ("from qwenvl_cli.fit import check\n", "hub/ may import only the wings below it"),  # same rank
])
def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch, snippet, expected):
    """The test of the test: a module of hub/ that breaks the rule is named with the import."""
    bad = PACKAGE / "hub" / "_layer_probe.py"
    monkeypatch.setattr(Path, "read_text", _fake_read(bad, snippet))
    found = problems([bad])
    assert len(found) == 1 and expected in found[0] and found[0].startswith("qwenvl_cli/hub/_layer_probe.py:")


def test_cycles_are_found():
    a, b = PACKAGE / "hub" / "_a.py", PACKAGE / "hub" / "_b.py"
    texts = {a: "from qwenvl_cli.hub import _b\n", b: "def f():\n    from qwenvl_cli.hub import _a\n"}
    real_read, real_file = Path.read_text, Path.is_file
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "read_text", lambda self, *a_, **k: texts[self] if self in texts else real_read(self, *a_, **k))
        mp.setattr(Path, "is_file", lambda self: self in texts or real_file(self))
        assert cycles([a, b]) == [["qwenvl_cli.hub._a", "qwenvl_cli.hub._b", "qwenvl_cli.hub._a"]]


def _fake_read(target: Path, text: str):
    real = Path.read_text

    def read(self, *args, **kwargs):
        return text if self == target else real(self, *args, **kwargs)
    return read


def test_modules_stay_small():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in modules()}
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def test_cli_functions_stay_short():
    """Commands are thin: no function in cli/ over 60 lines (signature and docstring included)."""
    long = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
