"""Readouts are a registry like lenses, operators and interventions: every name is built through READOUTS, and one
entry makes a new readout known to build_readouts and the name checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from dipreg.eval.readouts import READOUTS, ReadoutError, ReadoutOptions, ReadoutResult, build_readouts
from dipreg.eval.readouts.readout import GenerativeReadout, ScoreReadout, run_readouts, validate_readout_names
from dipreg.stimuli import load_vignettes


@dataclass
class AlwaysFirst:
    """A readout that needs no model: it picks the first option in both contexts."""

    name: str = "always_first"
    pair_rule: str = "both"

    def __call__(self, model, tokenizer, vignettes, session=None) -> ReadoutResult:
        ids, answer_a = [v.id for v in vignettes], np.array([v.answer_a for v in vignettes])
        return ReadoutResult(self.name, ids, answer_a, [0] * len(ids), [0] * len(ids), "both")


def test_the_built_in_readouts_are_built_by_name_with_their_options():
    assert list(READOUTS) == ["label", "semantic", "constrained", "extractive", "free", "judge"]
    options = ReadoutOptions(max_new_tokens=5, extractive_tokens=3)
    label, constrained, extractive, free = (
        READOUTS[n](options) for n in ("label", "constrained", "extractive", "free")
    )
    assert isinstance(label, ScoreReadout) and (label.name, label.pair_rule) == ("label", "did")
    assert (constrained.name, constrained.pair_rule) == ("constrained", "both")
    assert isinstance(extractive, GenerativeReadout) and (extractive.mode, extractive.max_new_tokens) == (
        "extractive",
        3,
    )
    assert (free.mode, free.max_new_tokens) == ("free", 5)
    with pytest.raises(ReadoutError, match="--judge"):
        READOUTS["judge"](options)


def test_one_entry_registers_a_new_readout_everywhere(monkeypatch):
    with pytest.raises(ReadoutError, match="'always_first'"):
        validate_readout_names(["always_first"], has_judge=False)
    monkeypatch.setitem(READOUTS, "always_first", lambda options: AlwaysFirst())
    validate_readout_names(["label", "always_first"], has_judge=False)
    (readout,) = build_readouts(["always_first"])
    vignettes = load_vignettes()[:4]
    result = run_readouts(None, None, vignettes, [readout])["always_first"]
    # both contexts pick option 0: a pair is right only when option 0 is right in both, which no vignette allows
    assert result.correct.tolist() == [False] * 4
    assert result.correct_a.tolist() == [v.answer_a == 0 for v in vignettes]
