"""The package list in pyproject.toml names every package of the source tree.

setuptools installs only the packages listed in ``[tool.setuptools] packages``; a subpackage missing
there works in an editable checkout and is absent from a wheel (``import lnprobe.discovery`` fails
after ``pip install .``).
"""
from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in config["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_source_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert _source_packages() == set(config["packages"])


def test_the_check_sees_a_missing_package(tmp_path):
    # counter-example: the walk finds lnprobe.discovery, so dropping it from the list is caught
    assert "lnprobe.discovery" in _source_packages()
    assert "lnprobe.analysis" in _source_packages()
