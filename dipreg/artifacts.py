"""Writing run artifacts: JSON files and the output folder. Every number a report prints goes through here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def prepare_out_dir(out: str | Path) -> Path:
    """Create ``out`` (and parents) and return it as a Path; a clear error if it is a file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} is a file; pass a folder for the artifacts.")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clean(value: Any) -> Any:
    """Non-finite floats become None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented standard JSON (NaN/inf as null) and return the path."""
    path = Path(path)
    path.write_text(json.dumps(_clean(payload), indent=1) + "\n")
    return path
