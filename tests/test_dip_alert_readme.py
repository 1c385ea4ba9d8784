"""README "Stop or keep checkpoints on the dip": the example runs as written below its marker line, on a tiny model,
and keeps the checkpoint of the probed step with the lowest causal dip at saturated accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from sharded_run import PAIRS

from dipreg import DipRegModule, PairDataModule
from dipreg.stimuli import save_pairs
from tests.conftest import make_tiny_model
from tests.readme_examples import README, readme_example


def test_readme_example_keeps_the_lowest_causal_dip_at_saturated_accuracy(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Trainer's default root (logs, checkpoints)
    torch.manual_seed(0)
    module = DipRegModule(model=make_tiny_model("llama"), tokenizer=tiny_tokenizer, r=4, alpha=8, dropout=0.0, lr=0.02)
    pairs = str(save_pairs(PAIRS, tmp_path / "pairs.jsonl"))
    data = PairDataModule(train=pairs, val=[], batch_size=14, shuffle=False, prompt="raw")
    scope = {"module": module, "data": data, "probe_pairs": PAIRS, "every": 2, "steps": 20}
    exec(compile(readme_example("### Stop or keep checkpoints on the dip"), str(README), "exec"), scope)

    keep, alert, history = scope["keep"], scope["alert"], scope["monitor"].history
    saturated = [
        (h["dip/causal/max_wrong_dip"], int(h["step"]))
        for h in history
        if h["step"] > 0 and h["dip/causal/accuracy"] >= alert.rule.min_accuracy  # step 0 is no checkpoint step
    ]
    assert saturated, "no probe reached saturated accuracy: the example proves nothing"
    best_dip = min(dip for dip, _ in saturated)
    best_step = next(step for dip, step in saturated if dip == best_dip)  # ModelCheckpoint keeps the first of ties
    assert float(keep.best_model_score) == best_dip
    assert Path(keep.best_model_path).name == f"lowest-causal-dip-step={best_step}.ckpt"
    assert torch.load(keep.best_model_path, weights_only=True)["global_step"] == best_step
    assert not math.isinf(float(keep.best_model_score))
