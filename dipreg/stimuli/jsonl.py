"""Loading stimulus sets by built-in name or JSONL path, and saving them as JSONL."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

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


class _DuplicateKeyError(ValueError):
    """A JSON object names one key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of :func:`json.loads`: a key given twice is an error (the first would be lost)."""
    record: dict[str, Any] = {}
    for key, value in items:
        if key in record:
            raise _DuplicateKeyError(key)
        record[key] = value
    return record


def _parse_line(raw: bytes, where: str, first: bool) -> Any:
    """Decode one line as UTF-8 and parse it as JSON; every failure is a :class:`StimulusError` naming ``where``."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")  # a byte-order mark may open the file
    except UnicodeDecodeError as err:
        raise StimulusError(
            f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line). "
            "Save the file as UTF-8."
        ) from err
    if not text.strip():
        return None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise StimulusError(
            f"{where}: invalid JSON ({err.msg} at column {err.colno}). "
            "Each line must hold exactly one JSON object; fix or remove the line."
        ) from err
    except _DuplicateKeyError as err:
        raise StimulusError(f"{where}: field {err.key[:60]!r} appears twice in one object; keep one of them.") from err
    except (ValueError, RecursionError) as err:  # an integer too long to convert, nesting too deep
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]
        raise StimulusError(f"{where}: unreadable JSON ({reason}). Fix or remove the line.") from err


def load_pairs(path_or_name: str | os.PathLike[str]) -> list[MinimalPair]:
    """Load minimal pairs from a built-in set name (see :data:`BUILTIN_SETS`) or a JSONL file.

    A string equal to a built-in name always selects the built-in set. A JSONL file holds one UTF-8 JSON object
    per line (blank lines are ignored; lines end with ``\\n``, ``\\r\\n`` or ``\\r``); a missing ``id`` becomes
    ``f"{family}-{line_no}"``.
    Raises :class:`FileNotFoundError` for a missing path and :class:`StimulusError` for anything else: bytes that
    are not UTF-8, invalid JSON, a key given twice, an unknown, missing, ill-typed or blank field, identical
    contexts, an empty set or duplicate ids; every message names the file and line (and the item id when known).
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
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StimulusError(f"{path}: cannot be read ({err.strerror or err}). Check its permissions.") from err
    pairs: list[MinimalPair] = []
    first_line: dict[str, int] = {}
    for line_no, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{line_no}"
        record = _parse_line(raw, where, first=line_no == 1)
        if record is None:
            continue
        pair = MinimalPair.from_dict(record, where=where, line_no=line_no)
        if pair.id in first_line:
            raise StimulusError(
                f"{where}: duplicate id {pair.id[:60]!r} (first used on line {first_line[pair.id]}). "
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
