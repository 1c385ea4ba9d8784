"""Writing run artifacts: JSON files and the output folder. Every number a report prints goes through here.

Every JSON artifact is strict JSON (``NaN``/``Infinity`` are not JSON: non-finite numbers are written as ``null``)
and is written atomically: a run killed while writing leaves the previous file or none, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import uuid
from collections.abc import Mapping
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
    """``value`` with every non-finite float (at any depth) replaced by ``None`` and mapping keys as strings.

    Real numbers that are not ``int``/``float`` (e.g. NumPy scalars) become floats; tuples become lists.
    """
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _clean(float(value))
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented strict JSON (NaN/±inf as ``null``) atomically, and return the path.

    The text goes to a temporary file in the same folder, is flushed and fsync'ed, and then ``os.replace`` puts it
    under ``path`` in one step; on any failure the temporary file is removed and ``path`` keeps its old content.
    A value JSON cannot hold raises ``TypeError`` before anything is written.
    """
    path = Path(path)
    text = json.dumps(_clean(payload), indent=1, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for a plain write
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
