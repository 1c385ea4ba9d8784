"""Loading stimulus sets by built-in name or JSONL path, and saving them as JSONL."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from .compositional import COMPOSITIONAL_SETS, generate_compositional
from .generate import generate_core, generate_role_binding
from .schema import MinimalPair, StimulusError

__all__ = ["BUILTIN_SETS", "load_pairs", "save_pairs"]

_BUILTIN: dict[str, Callable[[], list[MinimalPair]]] = {
    "core": generate_core,
    "role_binding": generate_role_binding,
    **{name: partial(generate_compositional, name) for name in COMPOSITIONAL_SETS},
}

#: Names :func:`load_pairs` resolves to generated sets instead of files.
BUILTIN_SETS: tuple[str, ...] = tuple(_BUILTIN)


def load_pairs(path_or_name: str | os.PathLike[str]) -> list[MinimalPair]:
    """Load minimal pairs from a built-in set name (see :data:`BUILTIN_SETS`) or a JSONL file.

    A string equal to a built-in name always selects the built-in set. A JSONL file holds one JSON object
    per line (blank lines are ignored); a missing ``id`` becomes ``f"{family}-{line_no}"``.
    Raises :class:`FileNotFoundError` for a missing path and :class:`StimulusError` for invalid JSON, a
    missing or ill-typed field, an empty set or duplicate ids; every message names the file and line.
    """
    if isinstance(path_or_name, str) and path_or_name in _BUILTIN:
        return _BUILTIN[path_or_name]()
    path = Path(path_or_name)
    if not path.exists():
        raise FileNotFoundError(
            f"Stimulus file {str(path)!r} does not exist. Pass an existing JSONL file (one JSON object "
            f"per line) or a built-in set name: {', '.join(BUILTIN_SETS)}."
        )
    if not path.is_file():
        raise StimulusError(f"{path} is not a file. Pass a JSONL file or one of: {', '.join(BUILTIN_SETS)}.")
    pairs: list[MinimalPair] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise StimulusError(
                    f"{where}: invalid JSON ({err.msg} at column {err.colno}). "
                    "Each line must hold exactly one JSON object; fix or remove the line."
                ) from err
            pair = MinimalPair.from_dict(record, where=where, line_no=line_no)
            if pair.id in first_line:
                raise StimulusError(
                    f"{where}: duplicate id {pair.id!r} (first used on line {first_line[pair.id]}). "
                    "Give every pair a unique id."
                )
            first_line[pair.id] = line_no
            pairs.append(pair)
    if not pairs:
        raise StimulusError(f"{path} contains no pairs. Add one JSON object per line, or use a built-in set.")
    return pairs


def save_pairs(pairs: Iterable[MinimalPair], path: str | os.PathLike[str]) -> Path:
    """Write ``pairs`` as JSONL (one object per line, parent folders created); returns the path.

    :func:`load_pairs` reads the file back into equal pairs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
    return path
