"""`dipreg bridge`: readouts on natural vignettes, intact vs degraded vs prompt interventions (paper §5.6, Fig. 7).

The semantic dip (max wrong dip of the per-layer semantic DiD) and the label dip are measured once on the intact
model. Then every readout runs clean, under each degradation (model restored and checksum-verified after each)
and under each prompt-level interface intervention on the intact model. Flips of every readout are stratified by
the intact semantic dip: structural damage should flip high-dip items (late rescue), interventions should not care.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.eval import stats
from dipreg.eval.degradation.ledger import check_restored, state_checksum
from dipreg.eval.degradation.operators import degrade, op_label, parse_ops
from dipreg.eval.readouts.figures import bridge_figure
from dipreg.eval.readouts.interventions import DEFAULT_INTERVENTIONS, intervene, validate_interventions
from dipreg.eval.readouts.readout import (
    DEFAULT_READOUTS,
    ReadoutResult,
    ReadoutSession,
    build_readouts,
    run_readouts,
    validate_readout_names,
)
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.models import load_model
from dipreg.plots import save_figure
from dipreg.prompting import PromptFormat
from dipreg.semantic import score_options
from dipreg.stimuli import balanced_subset, load_vignettes

#: The structural operators of the paper's bridge ladder: what `dipreg bridge` runs without --ops.
DEFAULT_BRIDGE_OPS = "deprive:alpha=0,late_svd:rank=64,mid_prune"
#: Vignettes `dipreg bridge` reads without --limit (a balanced subset; 0 = all): a CPU-sized default.
DEFAULT_LIMIT = 48


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def condition_result(clean: ReadoutResult, result: ReadoutResult, predictors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy of one readout under one condition, its flips against the clean run, and their stratification
    by each intact-model predictor (semantic dip, label dip, semantic margin)."""
    before, after = clean.correct, result.correct
    flip = stats.flips(before, after)
    at_risk = int(before.sum())
    items = result.items()
    items["flip"] = flip.tolist()
    return {
        **result.summary(),
        "n_at_risk": at_risk,
        "n_flips": int(flip.sum()),
        "flip_rate": float(flip.sum() / at_risk) if at_risk else float("nan"),
        "n_rescued": int((~before & after).sum()),
        "stratification": {name: stats.stratify(x, before, after) for name, x in predictors.items()},
        "items": items,
    }


def results_table(title: str, clean: dict[str, Any], conditions: dict[str, dict[str, Any]]) -> Table:
    """One row per condition x readout: pair and strict accuracy, flips / items at risk, high/low semantic-dip
    tertile flip rates, Mann–Whitney p and rank-biserial of the semantic dip (dying vs surviving)."""
    table = Table(title=title)
    for column in ("condition", "readout", "acc", "strict", "flips", "sdip hi/lo", "MW p", "rb"):
        justify = "left" if column in ("condition", "readout") else "right"
        table.add_column(column, justify=justify, no_wrap=True)
    for name, res in clean.items():
        table.add_row("clean", name, f"{res['accuracy']:.3f}", f"{res['strict_accuracy']:.3f}", "-", "-", "-", "-")
    for label, readouts in conditions.items():
        table.add_section()
        for name, res in readouts.items():
            dip = res["stratification"]["semantic_dip"]
            table.add_row(
                label,
                name,
                f"{res['accuracy']:.3f}",
                f"{res['strict_accuracy']:.3f}",
                f"{res['n_flips']}/{res['n_at_risk']}",
                f"{_fmt(dip['high_tertile_flip_rate'], '.2f')}/{_fmt(dip['low_tertile_flip_rate'], '.2f')}",
                _fmt(dip["mw_p"], ".2g"),
                _fmt(dip["rank_biserial"], "+.2f"),
            )
    return table


def run_bridge(
    model_name: str | None,
    pairs: str = "vignettes",
    readouts: Sequence[str] = DEFAULT_READOUTS,
    ops: str = DEFAULT_BRIDGE_OPS,
    interventions: Sequence[str] = DEFAULT_INTERVENTIONS,
    out: str | Path = "runs/bridge",
    *,
    limit: int | None = DEFAULT_LIMIT,
    batch_size: int = 16,
    window: tuple[float, float] = DEFAULT_WINDOW,
    prompt: str = "auto",
    max_new_tokens: int = 16,
    extractive_tokens: int = 6,
    judge: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the bridge, write ``bridge.json`` and ``bridge.png`` into ``out``, print the table, return the payload.

    Args:
        model_name: HF name or path; None for the embedded default model.
        pairs: vignette set(s): ``vignettes``, ``value_flip``, ``role_binding`` (comma-separated).
        readouts: readout names (``dipreg.eval.readouts.readout.READOUT_NAMES``).
        ops: degradation operators (``dipreg degrade`` syntax); empty string for none.
        interventions: prompt interventions (``dipreg.eval.readouts.interventions.INTERVENTIONS``).
        out: output folder.
        limit: keep a balanced subset of this many vignettes (None or 0: all).
        judge: HF name or path of the judge model (``"default"``: the embedded model); adds the judge readout.
    """
    console = console or Console()
    readouts = list(readouts)
    if judge is not None and "judge" not in readouts:
        readouts.append("judge")
    validate_readout_names(readouts, has_judge=judge is not None)
    validate_interventions(interventions)
    specs = parse_ops(ops) if ops.strip() else []
    if max_new_tokens < 1 or extractive_tokens < 1:
        raise ValueError("--max-new-tokens and --extractive-tokens must be >= 1.")
    vignettes = balanced_subset(load_vignettes(pairs), limit or None)
    out_dir = prepare_out_dir(out)
    model, tokenizer = load_model(model_name)
    judge_pair = load_model(None if judge == "default" else judge) if judge is not None else None
    built = build_readouts(
        readouts, judge=judge_pair, max_new_tokens=max_new_tokens, extractive_tokens=extractive_tokens
    )
    prompt_format = PromptFormat(prompt)  # type: ignore[arg-type]

    def session() -> ReadoutSession:
        return ReadoutSession(prompt=prompt_format, batch_size=batch_size, progress=True)

    checksum = state_checksum(model)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    scores = score_options(model, tokenizer, vignettes, prompt=prompt_format, batch_size=batch_size, progress=True)
    semantic, label = scores.trajectories("semantic", window), scores.trajectories("label", window)
    timings["dip_s"] = time.perf_counter() - start
    predictors = {
        "semantic_dip": semantic.max_wrong_dip.numpy(),
        "label_dip": label.max_wrong_dip.numpy(),
        "semantic_margin": semantic.did[:, -1].abs().numpy(),
    }
    start = time.perf_counter()
    clean_session = session()
    clean_session.share_scores(scores)
    clean = run_readouts(model, tokenizer, vignettes, built, clean_session)
    timings["clean_s"] = time.perf_counter() - start

    operators: dict[str, dict[str, Any]] = {}
    contrast: dict[str, dict[str, Any]] = {}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("conditions", total=len(specs) + len(interventions))
        for name, params in specs:
            label_ = op_label(name, params)
            bar.update(task, description=f"degrade {label_}")
            start = time.perf_counter()
            with degrade(model, name, verify=True, **params) as report:
                results = run_readouts(model, tokenizer, vignettes, built, session())
            operators[label_] = {
                "operator": report.as_dict(),
                "readouts": {k: condition_result(clean[k], r, predictors) for k, r in results.items()},
                "seconds": time.perf_counter() - start,
            }
            bar.advance(task)
        for name in interventions:
            bar.update(task, description=f"intervention {name}")
            start = time.perf_counter()
            results = run_readouts(model, tokenizer, intervene(name, vignettes), built, session())
            contrast[name] = {
                "readouts": {k: condition_result(clean[k], r, predictors) for k, r in results.items()},
                "seconds": time.perf_counter() - start,
            }
            bar.advance(task)
    check_restored(model, checksum, "the bridge run")

    payload = {
        "model": model_name or "default:SmolLM2-135M-Instruct",
        "judge": judge,
        "pairs": pairs,
        "limit": limit or None,
        "num_vignettes": len(vignettes),
        "num_layers": semantic.num_layers,
        "window": list(window),
        "prompt": prompt_format.resolved(tokenizer),
        "readouts": readouts,
        "ops": ops,
        "interventions": list(interventions),
        "max_new_tokens": max_new_tokens,
        "extractive_tokens": extractive_tokens,
        "intact": {
            "checksum": checksum,
            "semantic": semantic.summary(),
            "label": label.summary(),
            "items": {
                "id": [v.id for v in vignettes],
                "family": [v.family for v in vignettes],
                "subtype": [v.subtype for v in vignettes],
                "answer_a": [v.answer_a for v in vignettes],
                "semantic_dip": predictors["semantic_dip"].tolist(),
                "label_dip": predictors["label_dip"].tolist(),
                "semantic_did": semantic.did.tolist(),
                "label_did": label.did.tolist(),
            },
        },
        "clean": {k: {**r.summary(), "items": r.items()} for k, r in clean.items()},
        "operators": operators,
        "interventions_results": contrast,
        "restored_checksum_verified": True,
        "timings": timings,
    }
    write_json(out_dir / "bridge.json", payload)
    save_figure(bridge_figure(payload), out_dir / "bridge.png")
    conditions = {**{k: v["readouts"] for k, v in operators.items()}, **{k: v["readouts"] for k, v in contrast.items()}}
    title = (
        f"dipreg bridge — {payload['model']} on {pairs} (n={len(vignettes)}; flips stratified by the intact "
        f"semantic dip, mean {semantic.summary()['all']['mean_max_wrong_dip']:.3f})"
    )
    console.print(results_table(title, payload["clean"], conditions))
    console.print(f"wrote {out_dir / 'bridge.json'} and {out_dir / 'bridge.png'}")
    return payload
