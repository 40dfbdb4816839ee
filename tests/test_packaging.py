"""The built wheel ships the catalogue, and an installed (non-editable) qvl finds it."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

pytest.importorskip("hatchling")


def test_wheel_ships_specs_and_installed_copy_finds_them(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(REPO)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = wheels.glob("qvl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qwenvl_cli/specs/qwen2-vl-instruct.yaml" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300, capture_output=True)
    code = ("import json, qwenvl_cli.catalogue.load as s, qwenvl_cli.catalogue.resolve as r; c = s.load_catalogue(); "
            "print(json.dumps([str(s.builtin_specs_dir()), len(r.spec_rows(c)), s.__file__]))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(target), "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    specs_dir, count, module = json.loads(out.stdout)
    assert specs_dir.startswith(str(target)) and module.startswith(str(target))
    assert count == 12
