"""The summary's late-binding rate, strict accuracy and answer shares on hand-built trajectories (10 layers), with
the expected values counted by hand from the definitions in the README:

- commit_layer_frac = the largest ℓ/L whose DiD sign differs from the output's (an exact zero disagrees), 0 if none;
  late binding = commit_layer_frac ≥ 0.90;
- correct: DiD(L) > 0; strictly correct: margin_a(L) > 0 and margin_b(L) < 0.
"""

from __future__ import annotations

import pytest
import torch

from dipreg.stimuli import MinimalPair
from dipreg.trajectory import Trajectories

L = 10


def _pair(i: int, family: str, safety: bool) -> MinimalPair:
    return MinimalPair(f"p{i}", f"ctx a {i}", f"ctx b {i}", " Yes", " No", family, safety)


# Per item: (DiD over layers 1..10 with margin_b = -0.5 everywhere except the last layer, margin_b(L)), so that
# margin_a = DiD + margin_b. What each item is, counted by hand:
ITEMS = [
    # 0: flips to the right side only at layer 10 (layer 9 wrong): commit 0.9 -> late; a>0, b<0 -> strict
    ([-1.0] * 9 + [2.0], -1.0),
    # 1: wrong side last at layer 8: commit 0.8 -> not late; correct, b(L) = +0.5 > 0 -> not strict
    ([-1.0] * 8 + [1.0, 3.0], 0.5),
    # 2: an exact zero at layer 9 disagrees with the output: commit 0.9 -> late; a(L) = 0 -> not strict
    ([1.0] * 8 + [0.0, 1.0], -1.0),
    # 3: always on the output's side: commit 0 -> not late; strict
    ([2.0] * 10, -1.0),
    # 4: wrong output (DiD(L) < 0), agrees from layer 1 on: commit 0, not correct, not strict
    ([-2.0] * 10, 1.0),
    # 5: wrong output, disagrees at layer 9: commit 0.9 -> late; not correct
    ([-1.0] * 8 + [1.0, -1.0], 0.5),
]
FAMILIES = ["negation", "negation", "value_flip", "value_flip", "value_flip", "negation"]
SAFETY = [True, False, False, True, False, True]
LATE = [True, False, True, False, False, True]
CORRECT = [True, True, True, True, False, False]
STRICT = [True, False, False, True, False, False]


@pytest.fixture
def hand_built() -> Trajectories:
    margin_a, margin_b = [], []
    for did, b_last in ITEMS:
        b = [-0.5] * (L - 1) + [b_last]
        margin_b.append(b)
        margin_a.append([d + m for d, m in zip(did, b, strict=True)])
    pairs = [_pair(i, f, s) for i, (f, s) in enumerate(zip(FAMILIES, SAFETY, strict=True))]
    return Trajectories(pairs, "logit", torch.tensor(margin_a), torch.tensor(margin_b))


def _share(flags, mask) -> float:
    kept = [f for f, m in zip(flags, mask, strict=True) if m]
    return sum(kept) / len(kept)


def test_commit_depth_late_binding_and_strict_accuracy_follow_their_definitions(hand_built):
    assert hand_built.commit_layer_frac.tolist() == pytest.approx([0.9, 0.8, 0.9, 0.0, 0.0, 0.9])
    assert hand_built.correct.tolist() == CORRECT
    assert hand_built.strict_correct.tolist() == STRICT
    summary = hand_built.summary()
    subsets = {
        "all": [True] * len(ITEMS),
        "negation": [f == "negation" for f in FAMILIES],
        "value_flip": [f == "value_flip" for f in FAMILIES],
        "safety": SAFETY,
    }
    for name, mask in subsets.items():
        got = summary[name] if name in ("all", "safety") else summary["families"][name]
        assert got["n"] == sum(mask), name
        assert got["late_binding_rate"] == pytest.approx(_share(LATE, mask)), name
        assert got["strict_accuracy"] == pytest.approx(_share(STRICT, mask)), name
        assert got["accuracy"] == pytest.approx(_share(CORRECT, mask)), name
    assert summary["all"]["late_binding_rate"] == pytest.approx(3 / 6)
    assert summary["all"]["strict_accuracy"] == pytest.approx(2 / 6)


def test_answer_shares_count_contexts_and_leave_ties_out(hand_built):
    # last-layer margins: a = [1, 3.5, 0, 1, -1, -0.5], b = [-1, 0.5, -1, -1, 1, 0.5]: 12 contexts, 6 > 0,
    # 5 < 0 and one exact tie (in neither share)
    summary = hand_built.summary()["all"]
    assert summary["answer_pos_share"] == pytest.approx(6 / 12)
    assert summary["answer_neg_share"] == pytest.approx(5 / 12)


def test_a_commit_just_below_nine_tenths_is_not_late_binding():
    # 8 layers: wrong side last at layer 7 -> commit 7/8 = 0.875 < 0.90; at layer 8 never (it is the output)
    did = torch.tensor([[-1.0] * 7 + [1.0], [1.0] * 8])
    traj = Trajectories([_pair(0, "negation", False), _pair(1, "negation", False)], "logit", did, torch.zeros(2, 8))
    assert traj.commit_layer_frac.tolist() == pytest.approx([0.875, 0.0])
    assert traj.summary()["all"]["late_binding_rate"] == 0.0
