"""The self-check's required versions are pyproject's dependencies, read from the installed package's metadata."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from dipreg.selftest.versions import required, versions

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _declared() -> dict[str, str]:
    """pyproject's ``[project] dependencies`` as name -> specifier, parsed here without the code under test."""
    out = {}
    for line in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]:
        name, specifier = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*)", line).groups()
        out[name.lower()] = specifier.replace(" ", "")
    return out


def test_required_versions_are_the_dependencies_pyproject_declares():
    got = {name.lower(): spec for name, spec in required().items()}
    assert got == _declared(), "the installed metadata differs from pyproject.toml: reinstall (pip install -e .)"
    assert "bitsandbytes" not in got and "pytest" not in got  # optional extras are not requirements


def test_versions_reports_an_installed_version_for_each_requirement():
    report = versions()
    assert report["required"] == required()
    assert set(report["found"]) == set(required()) and report["found"]["torch"] is not None
