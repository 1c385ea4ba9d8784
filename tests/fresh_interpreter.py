"""Import-isolation checks that need a fresh interpreter, all in ONE child process (each interpreter start imports
torch and transformers again; one start instead of four keeps the fast tier fast).

Run by the session fixture ``fresh_interpreter`` in ``tests/conftest.py`` as
``python tests/fresh_interpreter.py OUT_DIR MODULE...``; prints one JSON object: for each check, ``null`` when it
held, else what went wrong. The checks run in this order, because the later ones import more:

- ``import_dipreg``: ``import dipreg`` imports no Lightning;
- ``cli_help``: ``dipreg --help``, ``dipreg audit --help`` exit 0, and an audit of a missing pairs file exits 2,
  still without Lightning;
- ``audit_path``: the CLI, lens, eval, arms and bench packages and the lens/causal bench sections import without
  Lightning;
- ``any_loop``: the any-loop API (``DipTracker``, ``DipAlertRule`` from ``dipreg.callbacks``) imports without
  Lightning;
- ``lazy_module``: ``dipreg.DipRegModule`` (the one attribute that needs Lightning) resolves;
- ``each_module``: every module of the distribution imports alone (dipreg's modules dropped from ``sys.modules``
  before each; third-party packages stay loaded, they are not what this checks).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import pkgutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

PACKAGES = ("dipreg", "dipreg.callbacks", "dipreg.eval", "dipreg.recipes")


def distribution_modules() -> dict[str, Path]:
    """Every module of the distribution -> its source file."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin is not None
        found[package] = Path(spec.origin)
        for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=f"{package}."):
            sub = importlib.util.find_spec(info.name)
            assert sub is not None and sub.origin is not None
            found[info.name] = Path(sub.origin)
    return found


def _no_lightning() -> None:
    assert "lightning" not in sys.modules, "lightning imported"


def _import_dipreg() -> None:
    import dipreg  # noqa: F401

    _no_lightning()


def _cli_help(out_dir: str) -> None:
    from dipreg.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for argv in (["--help"], ["audit", "--help"]):
            try:
                main(argv)
            except SystemExit as exit_:
                assert exit_.code == 0, f"{argv} exited {exit_.code}"
        code = main(["audit", "--pairs", "/nonexistent.jsonl", "--out", f"{out_dir}/audit"])
    assert code == 2, f"an audit of a missing pairs file exited {code}"
    _no_lightning()


def _audit_path() -> None:
    for name in ("dipreg.cli", "dipreg.lenses", "dipreg.eval", "dipreg.eval.arms", "dipreg.bench"):
        importlib.import_module(name)
    from dipreg.bench import load_sections

    load_sections(["lens", "causal"])
    _no_lightning()


def _any_loop() -> None:
    from dipreg.callbacks import DipAlertRule, DipTracker  # noqa: F401  (the any-loop API)

    _no_lightning()


def _lazy_module() -> None:
    import dipreg

    assert dipreg.DipRegModule.__name__ == "DipRegModule"


def _each_module(names: list[str]) -> None:
    failed = []
    for name in names:
        for key in [k for k in sys.modules if k == "dipreg" or k.startswith("dipreg.")]:
            del sys.modules[key]
        try:
            importlib.import_module(name)
        except Exception as err:
            failed.append(f"{name}: {err!r}")
    assert not failed, "\n".join(failed)


def start(out_dir: Path) -> subprocess.Popen:
    """Start this file in a fresh interpreter (from the test process); :func:`finish` reads its report."""
    command = [sys.executable, __file__, str(out_dir), *sorted(distribution_modules())]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> dict[str, str | None]:
    """Wait for the child started by :func:`start` and return its report."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and stdout.strip(), stdout + stderr
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    """Run every check in order; print ``{check: None | error text}`` as one JSON line."""
    out_dir, modules = argv[0], argv[1:]
    checks: dict[str, Callable[[], None]] = {
        "import_dipreg": _import_dipreg,
        "cli_help": lambda: _cli_help(out_dir),
        "audit_path": _audit_path,
        "any_loop": _any_loop,
        "lazy_module": _lazy_module,
        "each_module": lambda: _each_module(modules),
    }
    report: dict[str, str | None] = {}
    for name, check in checks.items():
        try:
            check()
            report[name] = None
        except BaseException:
            report[name] = traceback.format_exc()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
