"""Table 3 (fragility, NLL, accuracy, dip, retention), Table 5 (causal dip change vs untrained) and the monitor
forecast (saturation step, Spearman ρ) of `dipreg arms`, recomputed here from per-item records by a few lines of
plain Python and checked against the numbers and the text of the report.

The per-item records come from the real ``evaluate_model`` on tiny stand-in models (one per arm × seed); their
per-item correctness is itself checked against independent computations (the model's own output logits; the
deprived model built by deleting its last blocks; the NLL from the model's own ``labels=`` loss). The monitor
histories are hand-built.
"""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

from dipreg.eval.arms import stats as arms_stats
from dipreg.eval.arms.evaluate import evaluate_model, parse_conditions
from dipreg.eval.arms.report import build_tables, render_markdown
from dipreg.stimuli import MinimalPair
from tests.conftest import make_tiny_model

RETENTION = "mid_svd:rank=2"  # a rank the tiny width allows, standing in for the paper's mid_svd:rank=64
CONDITIONS = f"clean,{RETENTION},deprive:alpha=0,fraction=0.25"
DEPRIVED_BLOCKS = 2  # fraction 0.25 of 8 blocks, ending at the last one
NLL_TEXTS = [
    "Alice chased Bob .",
    "the cat chased the dog .",
    "is it good to help ? Yes",
    "ice is cold and fire is hot .",
]
#: arm -> seed -> the tiny model's init seed
MODELS = {"untrained": {0: 0}, "output_only": {0: 1, 1: 2}, "dip_reg_l0.2": {0: 3, 1: 4}}


def _pairs() -> list[MinimalPair]:
    """Eight pairs, no two of them mirror images (a mirrored pair has exactly the opposite DiD)."""
    frames = ["Question : is it {} to {} ? Answer :", "is it {} to {} ? Yes or No ?"]
    return [
        MinimalPair(
            f"v{k}-{good}-{verb}", frame.format(good, verb), frame.format(bad, verb), " Yes", " No", "value_flip", False
        )
        for k, frame in enumerate(frames)
        for good, bad in (("good", "bad"), ("right", "wrong"))
        for verb in ("help", "steal")
    ]


@torch.no_grad()
def _output_correct(model, tokenizer, pairs) -> list[bool]:
    """DiD(L) > 0 from the model's own output logits, one context at a time."""
    correct = []
    for p in pairs:
        pos, neg = (tokenizer.encode(t, add_special_tokens=False)[0] for t in (p.t_pos, p.t_neg))
        margins = []
        for ctx in (p.ctx_a, p.ctx_b):
            logits = model(input_ids=torch.tensor([tokenizer(ctx)["input_ids"]]), use_cache=False).logits[0, -1]
            margins.append(float(logits[pos] - logits[neg]))
        correct.append(margins[0] - margins[1] > 0)
    return correct


def _without_last_blocks(model, count: int):
    """A copy whose last ``count`` decoder blocks are deleted: what α = 0 deprivation makes of them (identity)."""
    cut = copy.deepcopy(model)
    cut.model.layers = cut.model.layers[:-count]
    cut.config.num_hidden_layers -= count
    if getattr(cut.config, "layer_types", None):
        cut.config.layer_types = cut.config.layer_types[:-count]
    return cut


@torch.no_grad()
def _hf_nll(model, tokenizer, texts) -> float:
    """Token-weighted mean of the model's own ``labels=`` loss, one text at a time (no padding)."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


@pytest.fixture
def evaluations(tiny_tokenizer):
    """arm -> seed -> evaluate_model's record, each checked against the independent per-item references."""
    pairs = _pairs()
    labels = [label for label, _, _ in parse_conditions(CONDITIONS)]
    out: dict[str, dict[int, dict]] = {}
    for arm, seeds in MODELS.items():
        for seed, init in seeds.items():
            model = make_tiny_model("llama", seed=init)
            ev = evaluate_model(model, tiny_tokenizer, pairs, CONDITIONS, nll_texts=NLL_TEXTS, batch_size=5)
            clean = ev["conditions"]["clean"]["correct"]
            assert clean == _output_correct(model, tiny_tokenizer, pairs), (arm, seed)
            deprived = ev["conditions"][labels[2]]["correct"]
            assert deprived == _output_correct(_without_last_blocks(model, DEPRIVED_BLOCKS), tiny_tokenizer, pairs)
            assert ev["nll"] == pytest.approx(_hf_nll(model, tiny_tokenizer, NLL_TEXTS), rel=1e-5)
            out.setdefault(arm, {})[seed] = ev
    return out


def _fragility(ev) -> float | None:
    """Flip rate under α = 0 deprivation among the items correct when clean, from the per-item lists."""
    clean = ev["conditions"]["clean"]["correct"]
    deprived = next(c["correct"] for label, c in ev["conditions"].items() if label.startswith("deprive"))
    kept = [d for c, d in zip(clean, deprived, strict=True) if c]
    return sum(not d for d in kept) / len(kept) if kept else 0.0


def _table(markdown: str, title: str) -> dict[str, dict[str, str]]:
    """The Markdown table under the heading that starts with ``## {title}``: first cell -> column -> cell text."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {title}"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:] if set(rows[1][0]) <= {"-"} else rows[1:]
    return {row[0]: dict(zip(header, row, strict=True)) for row in body}


def _mean(values) -> float:
    return sum(values) / len(values)


def _cell(values) -> str:
    """The report's "mean ± sd" cell (mean alone for one value), formatted here, not by the report."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


#: hand-built monitor histories per (arm, seed): probe accuracy first reaches 0.95 at SATURATION[(arm, seed)]
SATURATION = {("output_only", 0): 4, ("output_only", 1): None, ("dip_reg_l0.2", 0): 0, ("dip_reg_l0.2", 1): 6}
END_DIP = {("output_only", 0): 0.40, ("output_only", 1): 0.10, ("dip_reg_l0.2", 0): 0.25, ("dip_reg_l0.2", 1): 0.05}


def _history(arm: str, seed: int) -> list[dict[str, float]]:
    saturated = SATURATION[(arm, seed)]
    return [
        {
            "step": float(step),
            "dip/logit/accuracy": 0.96 if saturated is not None and step >= saturated else 0.94 - 0.01 * step,
            "dip/logit/max_wrong_dip": END_DIP[(arm, seed)] + 0.1 * (6 - step),
            "dip/causal/max_wrong_dip": 2 * END_DIP[(arm, seed)] + 0.1 * (6 - step),
        }
        for step in (0, 2, 4, 6)
    ]


def _ranks(values) -> list[float]:
    """Average ranks (1-based; ties share the mean of their positions)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(x, y) -> float:
    rx, ry = _ranks(x), _ranks(y)
    mx, my = _mean(rx), _mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_tables_3_5_and_the_forecast_equal_a_recomputation_from_the_items(evaluations, monkeypatch):
    monkeypatch.setattr(arms_stats, "RETENTION_CONDITION", RETENTION)
    untrained = evaluations["untrained"][0]
    arms = [a for a in MODELS if a != "untrained"]
    runs = [
        {"arm": arm, "seed": seed, "monitor": _history(arm, seed), "eval": evaluations[arm][seed]}
        for arm in arms
        for seed in MODELS[arm]
    ]
    fragilities = [_fragility(r["eval"]) for r in runs]
    assert max(fragilities) > 0 and min(fragilities) < 1, "the stand-in models must flip some items, not all"
    tables = {
        "retention_condition": RETENTION,
        "table3": arms_stats.arm_table(runs, untrained),
        "table4": arms_stats.retention_table(runs, untrained),
        "table5": arms_stats.causal_table(runs, untrained),
        "forecast": arms_stats.forecast(runs),
    }
    result = {
        "model": "tiny",
        "arms": arms,
        "seeds": [0, 1],
        "quick": True,
        "settings": {"prompt": "raw"},
        "eval_pairs": "hand",
        "eval_n": len(_pairs()),
        "tables": tables,
    }
    report = render_markdown(result, build_tables(result), [])

    # Table 3, per arm: every column recomputed from the per-item lists, then the report's row text.
    def per_item(ev):
        return {
            "accuracy": _mean(ev["conditions"]["clean"]["correct"]),
            "dip": _mean(ev["items"]["logit_dip"]),
            "fragility": _fragility(ev),
            "nll": ev["nll"],
            "retention": _mean(ev["conditions"][RETENTION]["correct"]),
        }

    rows3 = {row["arm"]: row for row in tables["table3"]}
    for arm in MODELS:
        seeds = [per_item(evaluations[arm][s]) for s in MODELS[arm]]
        cells = {}
        for key in ("accuracy", "dip", "fragility", "nll", "retention"):
            values = [s[key] for s in seeds]
            assert rows3[arm][key]["mean"] == pytest.approx(_mean(values), abs=1e-6), (arm, key)
            if len(values) > 1:
                assert rows3[arm][key]["sd"] == pytest.approx(statistics.stdev(values), abs=1e-6), (arm, key)
            cells[key] = _cell(values)
        printed = _table(report, "Table 3")[arm]
        for key, column in (("accuracy", "acc"), ("dip", "dip"), ("fragility", "fragility"), ("nll", "NLL")):
            assert printed[column] == cells[key], (arm, column)
        assert printed[f"acc after {RETENTION}"] == cells["retention"], arm

    # Table 5: causal dip per arm and its relative change vs the untrained model, as the report prints it.
    base = _mean(untrained["items"]["causal_dip"])
    rows5 = {row["arm"]: row for row in tables["table5"]}
    for arm in arms:
        dip = _mean([_mean(evaluations[arm][s]["items"]["causal_dip"]) for s in MODELS[arm]])
        change = (dip - base) / abs(base)
        assert rows5[arm]["change_vs_untrained"] == pytest.approx(change, abs=1e-6), arm
        assert rows5[arm]["causal_dip"]["mean"] == pytest.approx(dip, abs=1e-6)
        printed = _table(report, "Table 5")[arm]
        [column] = [c for c in printed if "vs untrained" in c]  # the column of the change vs untrained
        assert printed[column] == f"{change:+.0%}", arm

    # Forecast: the saturation step and the end-of-training values of every run, and Spearman ρ across runs.
    fc = tables["forecast"]
    by_run = {(p["arm"], p["seed"]): p for p in fc["runs"]}
    for key, saturated in SATURATION.items():
        assert by_run[key]["saturation_step"] == saturated, key
        assert by_run[key]["end_logit_dip"] == pytest.approx(END_DIP[key])
    retention = [_mean(evaluations[a][s]["conditions"][RETENTION]["correct"]) for a, s in SATURATION]
    rho = _spearman(list(END_DIP.values()), retention)
    assert fc["spearman_logit_dip_vs_retention"]["rho"] == pytest.approx(rho, abs=1e-9)
    assert fc["spearman_causal_dip_vs_retention"]["rho"] == pytest.approx(rho, abs=1e-9)  # 2·dip + c: same ranks
    assert f"logit dip vs retention {rho:.2f}" in report
    for (arm, seed), saturated in SATURATION.items():
        step = "—" if saturated is None else str(saturated)
        assert f"| {arm} | {seed} | {step} | " in report, (arm, seed)
