"""`dipreg bridge`: readouts on natural vignettes, intact vs degraded vs prompt interventions (paper §5.6, Fig. 7).

The semantic dip (max wrong dip of the per-layer semantic DiD) and the label dip are measured once on the intact
model. Then every readout runs clean, under each degradation (model restored and checksum-verified after each)
and under each prompt-level interface intervention on the intact model. Flips of every readout are stratified by
the intact semantic dip: structural damage should flip high-dip items (late rescue), interventions should not care.

Stages, run in order by :func:`run_bridge`: :func:`measure_intact`, :func:`run_conditions`, :func:`write_report`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from dipreg.eval.degradation.presets import PRESETS
from dipreg.eval.readouts.figures import bridge_figure
from dipreg.eval.readouts.interventions import DEFAULT_INTERVENTIONS, intervene, validate_interventions
from dipreg.eval.readouts.readout import (
    DEFAULT_READOUTS,
    Readout,
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
from dipreg.stimuli import Vignette, balanced_subset, load_vignettes
from dipreg.trajectory import Trajectories
from dipreg.validation import validate_count, validate_window

#: The structural operators of the paper's bridge ladder: what `dipreg bridge` runs without --ops.
DEFAULT_BRIDGE_OPS = PRESETS["bridge"]
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


@dataclass
class IntactMeasure:
    """What :func:`measure_intact` read on the intact model; the conditions and the report start from it.

    Attributes:
        model, tokenizer: the loaded model (never left changed: checksum-verified after every condition).
        vignettes: the vignettes every condition reads.
        readouts: the built readouts (judge model included when asked for).
        prompt: the prompt format every session uses; batch_size: rows per forward pass.
        checksum: the intact model's state checksum.
        semantic, label: per-layer semantic and label trajectories of the intact model.
        predictors: per-vignette intact-model predictors the flips are stratified by.
        clean: every readout on the intact model.
        timings: seconds of the dip pass (``dip_s``) and the clean readouts (``clean_s``).
    """

    model: Any
    tokenizer: Any
    vignettes: list[Vignette]
    readouts: list[Readout]
    prompt: PromptFormat
    batch_size: int
    checksum: str
    semantic: Trajectories
    label: Trajectories
    predictors: dict[str, np.ndarray]
    clean: dict[str, ReadoutResult]
    timings: dict[str, float] = field(default_factory=dict)

    def session(self) -> ReadoutSession:
        """A fresh readout session (start one whenever the model changes)."""
        return ReadoutSession(prompt=self.prompt, batch_size=self.batch_size, progress=True)


@dataclass
class ConditionResults:
    """What :func:`run_conditions` measured: per degradation (``operators``) and per intervention (``contrast``)."""

    operators: dict[str, dict[str, Any]]
    contrast: dict[str, dict[str, Any]]

    def readouts(self) -> dict[str, dict[str, Any]]:
        """Condition label -> readout name -> :func:`condition_result`, degradations first."""
        return {
            **{k: v["readouts"] for k, v in self.operators.items()},
            **{k: v["readouts"] for k, v in self.contrast.items()},
        }


def measure_intact(
    model_name: str | None,
    vignettes: list[Vignette],
    readouts: Sequence[str],
    *,
    window: tuple[float, float],
    prompt: str,
    batch_size: int,
    max_new_tokens: int,
    extractive_tokens: int,
    judge: str | None,
) -> IntactMeasure:
    """Stage 1: load the model (and judge), read the semantic and label dips of the intact model and run every
    readout on it."""
    model, tokenizer = load_model(model_name)
    judge_pair = load_model(None if judge == "default" else judge) if judge is not None else None
    built = build_readouts(
        readouts, judge=judge_pair, max_new_tokens=max_new_tokens, extractive_tokens=extractive_tokens
    )
    prompt_format = PromptFormat(prompt)  # type: ignore[arg-type]
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
    clean_session = ReadoutSession(prompt=prompt_format, batch_size=batch_size, progress=True)
    clean_session.share_scores(scores)
    clean = run_readouts(model, tokenizer, vignettes, built, clean_session)
    timings["clean_s"] = time.perf_counter() - start
    return IntactMeasure(
        model=model,
        tokenizer=tokenizer,
        vignettes=vignettes,
        readouts=built,
        prompt=prompt_format,
        batch_size=batch_size,
        checksum=checksum,
        semantic=semantic,
        label=label,
        predictors=predictors,
        clean=clean,
        timings=timings,
    )


def run_conditions(
    intact: IntactMeasure,
    specs: Sequence[tuple[str, dict[str, Any]]],
    interventions: Sequence[str],
    console: Console,
) -> ConditionResults:
    """Stage 2: every readout under each degradation (model restored and verified after each) and under each
    prompt intervention on the intact model; flips against the clean run, stratified by the intact predictors."""
    model, tokenizer, vignettes, built = intact.model, intact.tokenizer, intact.vignettes, intact.readouts
    clean, predictors = intact.clean, intact.predictors
    operators: dict[str, dict[str, Any]] = {}
    contrast: dict[str, dict[str, Any]] = {}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("conditions", total=len(specs) + len(interventions))
        for name, params in specs:
            label_ = op_label(name, params)
            bar.update(task, description=f"degrade {label_}")
            start = time.perf_counter()
            with degrade(model, name, verify=True, tokenizer=tokenizer, **params) as report:
                results = run_readouts(model, tokenizer, vignettes, built, intact.session())
            operators[label_] = {
                "operator": report.as_dict(),
                "readouts": {k: condition_result(clean[k], r, predictors) for k, r in results.items()},
                "seconds": time.perf_counter() - start,
            }
            bar.advance(task)
        for name in interventions:
            bar.update(task, description=f"intervention {name}")
            start = time.perf_counter()
            results = run_readouts(model, tokenizer, intervene(name, vignettes), built, intact.session())
            contrast[name] = {
                "readouts": {k: condition_result(clean[k], r, predictors) for k, r in results.items()},
                "seconds": time.perf_counter() - start,
            }
            bar.advance(task)
    check_restored(model, intact.checksum, "the bridge run")
    return ConditionResults(operators, contrast)


def write_report(
    intact: IntactMeasure,
    conditions: ConditionResults,
    out_dir: Path,
    settings: dict[str, Any],
    console: Console,
) -> dict[str, Any]:
    """Stage 3: the ``bridge.json`` payload (``settings`` are the run's arguments, recorded as given), the figure
    ``bridge.png`` and the printed table; returns the payload."""
    semantic, label, vignettes = intact.semantic, intact.label, intact.vignettes
    payload: dict[str, Any] = {
        "model": settings["model"] or "default:SmolLM2-135M-Instruct",
        "judge": settings["judge"],
        "pairs": settings["pairs"],
        "limit": settings["limit"] or None,
        "num_vignettes": len(vignettes),
        "num_layers": semantic.num_layers,
        "window": list(settings["window"]),
        "prompt": intact.prompt.resolved(intact.tokenizer),
        "readouts": settings["readouts"],
        "ops": settings["ops"],
        "interventions": list(settings["interventions"]),
        "max_new_tokens": settings["max_new_tokens"],
        "extractive_tokens": settings["extractive_tokens"],
        "intact": {
            "checksum": intact.checksum,
            "semantic": semantic.summary(),
            "label": label.summary(),
            "items": {
                "id": [v.id for v in vignettes],
                "family": [v.family for v in vignettes],
                "subtype": [v.subtype for v in vignettes],
                "answer_a": [v.answer_a for v in vignettes],
                "semantic_dip": intact.predictors["semantic_dip"].tolist(),
                "label_dip": intact.predictors["label_dip"].tolist(),
                "semantic_did": semantic.did.tolist(),
                "label_did": label.did.tolist(),
            },
        },
        "clean": {k: {**r.summary(), "items": r.items()} for k, r in intact.clean.items()},
        "operators": conditions.operators,
        "interventions_results": conditions.contrast,
        "restored_checksum_verified": True,
        "timings": intact.timings,
    }
    write_json(out_dir / "bridge.json", payload)
    save_figure(bridge_figure(payload), out_dir / "bridge.png")
    title = (
        f"dipreg bridge — {payload['model']} on {settings['pairs']} (n={len(vignettes)}; flips stratified by the "
        f"intact semantic dip, mean {semantic.summary()['all']['mean_max_wrong_dip']:.3f})"
    )
    console.print(results_table(title, payload["clean"], conditions.readouts()))
    console.print(f"wrote {out_dir / 'bridge.json'} and {out_dir / 'bridge.png'}")
    return payload


def run_bridge(
    model_name: str | None = None,
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

    Bad input (readout, intervention and operator names, token counts, batch size, limit, window, prompt style,
    vignette sets) fails before ``out`` is created and before any model loads; then :func:`measure_intact`,
    :func:`run_conditions` and :func:`write_report` run in order.

    Args:
        model_name: HF name or path; None for the embedded default model.
        pairs: vignette set(s): ``vignettes``, ``value_flip``, ``role_binding`` (comma-separated).
        readouts: readout names (``dipreg.eval.readouts.READOUTS``).
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
    validate_count(max_new_tokens, "--max-new-tokens")
    validate_count(extractive_tokens, "--extractive-tokens")
    validate_count(batch_size, "--batch-size")
    if limit is not None:
        validate_count(limit, "--limit", 0, "0 = all vignettes")
    window = validate_window(window, "--window")
    PromptFormat(prompt)  # type: ignore[arg-type]  # an unknown style raises here
    vignettes = balanced_subset(load_vignettes(pairs), limit or None)
    out_dir = prepare_out_dir(out)
    intact = measure_intact(
        model_name,
        vignettes,
        readouts,
        window=window,
        prompt=prompt,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        extractive_tokens=extractive_tokens,
        judge=judge,
    )
    conditions = run_conditions(intact, specs, interventions, console)
    settings = {
        "model": model_name,
        "judge": judge,
        "pairs": pairs,
        "limit": limit,
        "window": window,
        "readouts": readouts,
        "ops": ops,
        "interventions": interventions,
        "max_new_tokens": max_new_tokens,
        "extractive_tokens": extractive_tokens,
    }
    return write_report(intact, conditions, out_dir, settings, console)
