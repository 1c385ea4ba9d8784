"""`dipreg prompt-styles`: the vignettes as label-readout pairs, the ranking of styles by strict accuracy on core,
the report file, and bad options refused before the model loads."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

import dipreg.prompt_styles as styles_module
from dipreg.prompt_styles import least_degenerate, load_set, vignette_label_pairs
from dipreg.prompting import PromptFormat
from dipreg.stimuli import load_vignettes
from dipreg.trajectory import Trajectories


def test_vignettes_become_pairs_whose_positive_label_is_the_option_correct_in_ctx_a():
    vignettes = load_vignettes("vignettes")
    pairs = vignette_label_pairs(vignettes)
    assert len(pairs) == len(vignettes) == 192
    for v, p in zip(vignettes, pairs, strict=True):
        correct_a = v.options[v.answer_a]
        label_a = "A" if v.options[0] == correct_a else "B"  # the label shown next to that option
        assert p.t_pos == f" {label_a}" and {p.t_pos, p.t_neg} == {" A", " B"}
        assert f"{label_a}) {correct_a}" in p.ctx_a and p.ctx_a.startswith(v.story_a) and p.ctx_a.endswith("Answer:")
        assert p.ctx_b.startswith(v.story_b) and p.family == f"vignette_{v.family}"
    assert load_set("vignettes") == pairs and load_set("role_binding")[0].id.startswith("role_binding")


def row(strict: float, pos: float, neg: float) -> dict[str, float]:
    return {"strict_accuracy": strict, "answer_pos_share": pos, "answer_neg_share": neg}


def test_the_least_degenerate_style_has_the_highest_strict_accuracy_on_core_then_the_smaller_majority():
    results = {
        "core": {"raw": row(0.04, 0.85, 0.15), "chat": row(0.0, 0.0, 1.0), "fewshot": row(0.09, 0.56, 0.44)},
        "role_binding": {"raw": row(0.9, 0.5, 0.5)},  # other sets do not rank
    }
    assert least_degenerate(results) == "fewshot"
    results["core"]["chat"] = row(0.09, 0.52, 0.48)  # a tie in strict accuracy: the more balanced answers win
    assert least_degenerate(results) == "chat"
    assert least_degenerate({"role_binding": results["role_binding"]}) is None


def test_report_measures_every_set_and_style_and_writes_json(monkeypatch, tmp_path, tiny_pairs, tiny_tokenizer):
    calls = []

    def fake(model, tokenizer, pairs, lens, *, batch_size, prompt, progress):
        calls.append((len(pairs), prompt.style, prompt.shots))
        sign = 1.0 if prompt.style == "raw" else -1.0  # raw answers as it should, chat says t_neg everywhere
        last = torch.tensor([[sign * 2.0 if prompt.style == "raw" else -1.0] for _ in pairs])
        other = torch.tensor([[-2.0] for _ in pairs])
        return Trajectories(pairs=list(pairs), lens="logit", margin_a=last, margin_b=other)

    monkeypatch.setattr(styles_module, "load_set", lambda name: tiny_pairs)
    monkeypatch.setattr(styles_module, "load_model", lambda name: (None, tiny_tokenizer))
    monkeypatch.setattr(styles_module, "trajectories", fake)
    console = Console(file=io.StringIO(), width=300)
    payload = styles_module.run_prompt_styles(
        None, ["core", "comp_strict"], ["raw", "auto"], tmp_path / "ps", shots=2, console=console
    )
    assert calls == [(4, "raw", 2), (4, "auto", 2)] * 2
    written = json.loads((tmp_path / "ps" / "prompt_styles.json").read_text())
    assert written == json.loads(json.dumps(payload))
    assert written["results"]["core"]["raw"]["strict_accuracy"] == 1.0
    assert written["results"]["core"]["auto"]["degenerate"] == {"side": "t_neg", "share": 1.0}
    assert written["least_degenerate_on_core"] == "raw" and written["styles"]["auto"] == "auto → raw"
    assert "least degenerate on core (highest strict accuracy): raw" in console.file.getvalue()


def test_bad_styles_are_refused_before_the_output_folder_and_the_model(monkeypatch, tmp_path):
    monkeypatch.setattr(styles_module, "load_model", lambda name: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="--styles: unknown or no style"):
        styles_module.run_prompt_styles(None, ["core"], ["raw", "markdown"], tmp_path / "ps")
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        styles_module.run_prompt_styles(None, ["core"], ["fewshot"], tmp_path / "ps", shots=0)
    assert not (tmp_path / "ps").exists()
    assert PromptFormat("fewshot", shots=2).shots == 2
