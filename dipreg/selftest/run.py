"""Run the three parts of the self-check and write ``selftest.json``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dipreg.architectures import SUPPORTED_MODEL_TYPES
from dipreg.artifacts import write_json
from dipreg.models import resolve_device
from dipreg.selftest.parity import run_parity
from dipreg.selftest.timing import PLANS, SIZE_MODELS, time_size
from dipreg.selftest.versions import versions

SIZES: tuple[str, ...] = tuple(SIZE_MODELS)


def run_selftest(
    device: str, out: str | Path, *, sizes: str | None = None, architectures: Sequence[str] | None = None
) -> dict[str, Any]:
    """Parity on tiny models of ``architectures`` (default: every supported one), timings of ``sizes`` (default:
    ``real`` on a GPU, ``tiny`` on a CPU), versions; writes ``<out>/selftest.json`` and returns it (plus ``path``
    and ``parity_ok``)."""
    target = resolve_device(device)
    sizes = sizes or ("real" if target.type == "cuda" else "tiny")
    if sizes not in SIZE_MODELS:
        raise ValueError(f"sizes={sizes!r}: choose from {', '.join(SIZES)}.")
    unknown = sorted(set(architectures or ()) - set(SUPPORTED_MODEL_TYPES))
    if unknown:
        raise ValueError(f"Unknown architecture(s) {unknown}; choose from {', '.join(SUPPORTED_MODEL_TYPES)}.")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity means float32 products
    start = time.perf_counter()
    report: dict[str, Any] = {"device": str(target), "sizes": sizes, "versions": versions()}
    report["parity"] = run_parity(target, architectures)
    report["parity_ok"] = all(part["ok"] for row in report["parity"]["architectures"].values() for part in row.values())
    report["timing"] = {name: time_size(name, target, PLANS[sizes]) for name in SIZE_MODELS[sizes]}
    report["seconds"] = time.perf_counter() - start
    path = Path(out) / "selftest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    report["path"] = str(path)
    return report
