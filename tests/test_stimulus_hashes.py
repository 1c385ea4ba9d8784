"""Every built-in stimulus set against a stored SHA-256 (``tests/data/stimulus_sha256.json``), and a JSONL round trip
of every set.

The stored hashes make any change to a generated set (a lexicon or template edit, a new ordering, a change in
generation between processes) a visible, reviewed diff of that file instead of a silent change of every published
number. Canonical serialisation, hashed as UTF-8 bytes:

    json.dumps([record(item) for item in items], sort_keys=True, ensure_ascii=False, separators=(",", ":"))

where ``record`` is ``dataclasses.asdict`` for a ``MinimalPair`` and ``Vignette.to_dict()`` for a vignette; the
list keeps the set's order. After a deliberate change, regenerate the file with
``python -m tests.test_stimulus_hashes`` and review its diff.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from dipreg.stimuli import BUILTIN_SETS, load_pairs, load_vignettes, save_pairs

STORED = Path(__file__).parent / "data" / "stimulus_sha256.json"
VIGNETTE_SETS = ("value_flip", "role_binding")


def canonical_sha256(records: list[dict[str, Any]]) -> str:
    """SHA-256 of the canonical JSON serialisation (see the module docstring)."""
    text = json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def current_hashes() -> dict[str, str]:
    """``pairs:<name>`` for every built-in pair set and ``vignettes:<name>`` for every vignette family."""
    out = {
        f"pairs:{name}": canonical_sha256([dataclasses.asdict(p) for p in load_pairs(name)]) for name in BUILTIN_SETS
    }
    for name in VIGNETTE_SETS:
        out[f"vignettes:{name}"] = canonical_sha256([v.to_dict() for v in load_vignettes(name)])
    return out


def test_every_built_in_set_matches_its_stored_sha256():
    stored = json.loads(STORED.read_text())
    current = current_hashes()
    assert set(current) == set(stored), "a set without a stored hash (or a stored hash without a set): regenerate"
    changed = sorted(name for name in stored if stored[name] != current[name])
    assert not changed, (
        f"generated stimulus set(s) {changed} changed; if intended, run `python -m tests.test_stimulus_hashes` "
        "and commit the reviewed diff of tests/data/stimulus_sha256.json"
    )


@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_every_built_in_set_round_trips_through_jsonl(name, tmp_path):
    pairs = load_pairs(name)
    path = save_pairs(pairs, tmp_path / f"{name}.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(pairs) and all(
        json.loads(line)["id"] == p.id for line, p in zip(lines, pairs, strict=True)
    )
    loaded = load_pairs(path)
    assert loaded == pairs
    assert canonical_sha256([dataclasses.asdict(p) for p in loaded]) == json.loads(STORED.read_text())[f"pairs:{name}"]


if __name__ == "__main__":
    STORED.write_text(json.dumps(current_hashes(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {STORED}")
