"""`dipreg arms`: train the recipe arms × seeds with the monitor on, evaluate each under compression, report.

Stages, each resumable (a finished piece leaves a marker file and is skipped on the next run):

1. :func:`train_stage`: train every arm × seed (:func:`~dipreg.eval.arms.train.train_arm`, through the same
   LightningCLI as `dipreg fit`; marker ``runs/<arm>/seed<k>/train.json``);
2. :func:`evaluate_stage`: evaluate the untrained model and every run
   (:func:`~dipreg.eval.arms.evaluate.evaluate_model`; marker ``eval.json``);
3. :func:`report_stage`: statistics (:mod:`~dipreg.eval.arms.stats`), ``arms.json``, figures, ``report.md`` and
   ``report.html``.

``arms_config.json`` records the settings; resuming into a folder made with other settings is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.eval.arms.evaluate import evaluate_model, general_texts, load_arm_model
from dipreg.eval.arms.figures import monitor_figure, retention_figure
from dipreg.eval.arms.plan import ARM_RECIPES, ArmSpec, ArmsSettings, build_arms
from dipreg.eval.arms.report import build_tables, render_html, render_markdown, rich_table
from dipreg.eval.arms.stats import RETENTION_CONDITION, arm_table, causal_table, forecast, retention_table
from dipreg.eval.arms.train import TRAIN_DONE, limited_pairs, train_arm
from dipreg.plots import save_figure

__all__ = ["DEFAULT_SEEDS", "EVAL_DONE", "evaluate_stage", "report_stage", "run_arms", "train_stage"]

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_LAMBDAS = (0.2,)
EVAL_DONE = "eval.json"
CONFIG_FILE = "arms_config.json"


def _check_config(out_dir: Path, config: dict[str, Any]) -> None:
    path = out_dir / CONFIG_FILE
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if changed:
            raise ValueError(
                f"{out_dir} holds an arms run with different settings ({', '.join(changed)}); resume with the same "
                "options or pass a new --out."
            )
    write_json(path, config)


def _eval_run(
    model_name: str | None, adapter: Path | None, pairs: list, settings: ArmsSettings, describe: Any
) -> dict[str, Any]:
    model, tokenizer = load_arm_model(model_name, adapter)
    return evaluate_model(
        model,
        tokenizer,
        pairs,
        settings.conditions,
        nll_texts=general_texts(settings.nll_texts),
        prompt=settings.prompt,
        batch_size=settings.batch_eval,
        on_condition=describe,
    )


class StageProgress:
    """One progress bar shared by the train and evaluate stages; without a ``Progress`` it shows nothing."""

    def __init__(self, progress: Progress | None = None, task: Any = None) -> None:
        self.progress, self.task = progress, task

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)


def _jobs(specs: list[ArmSpec], seeds: list[int]) -> list[tuple[ArmSpec, int]]:
    """Every arm × seed, seed-major (all arms of seed 0 first)."""
    return [(spec, seed) for seed in seeds for spec in specs]


def run_arms(
    model_name: str | None = None,
    arms: list[str] | None = None,
    lambdas: list[float] | None = None,
    seeds: list[int] | None = None,
    *,
    quick: bool = False,
    out: str | Path = "runs/arms",
    console: Console | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run (or resume) the arms experiment into ``out`` and return the ``arms.json`` payload.

    Runs :func:`train_stage`, :func:`evaluate_stage` and :func:`report_stage` in order.

    Args:
        model_name: base model (``None``: the embedded SmolLM2-135M-Instruct).
        arms: arm names from :data:`~dipreg.eval.arms.plan.ARM_RECIPES` (default: all three).
        lambdas: hinge weights; ``dip_reg`` trains one arm per λ (default: 0.2).
        seeds: training seeds (default: 0, 1, 2).
        quick: CI-sized smoke run (:meth:`ArmsSettings.quick`).
        out: output folder.
        **overrides: :class:`ArmsSettings` fields to change (``None`` values are ignored).
    """
    console = console or Console()
    settings = (ArmsSettings.quick() if quick else ArmsSettings()).with_overrides(**overrides)
    specs: list[ArmSpec] = build_arms(list(arms or ARM_RECIPES), list(lambdas or DEFAULT_LAMBDAS))
    seeds = list(DEFAULT_SEEDS if seeds is None else seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list distinct integers, got {seeds}.")
    if "output_only" not in [s.name for s in specs]:
        console.print("[yellow]note:[/] no output_only arm: the McNemar columns (vs output_only) stay empty.")
    out_dir = prepare_out_dir(out)
    _check_config(out_dir, {"model": model_name, "quick": quick, "settings": settings.as_dict()})
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = StageProgress(progress, progress.add_task("arms", total=2 * len(specs) * len(seeds) + 1))
        timings = train_stage(specs, seeds, settings, out_dir, model_name=model_name, bar=bar)
        timings |= evaluate_stage(specs, seeds, settings, out_dir, model_name=model_name, bar=bar)
    return report_stage(
        specs, seeds, settings, out_dir, model_name=model_name, quick=quick, timings=timings, console=console
    )


def train_stage(
    specs: list[ArmSpec],
    seeds: list[int],
    settings: ArmsSettings,
    out_dir: Path,
    *,
    model_name: str | None = None,
    bar: StageProgress | None = None,
) -> dict[str, float]:
    """Stage 1: train every arm × seed whose ``train.json`` is missing; returns the training times of this call."""
    bar = bar or StageProgress()
    timings: dict[str, float] = {}
    for spec, seed in _jobs(specs, seeds):
        run_dir = _run_dir(out_dir, spec, seed)
        if not (run_dir / TRAIN_DONE).exists():
            bar.describe(f"train {spec.name} seed {seed}")
            start = time.perf_counter()
            train_arm(spec, seed, settings, run_dir, model_name=model_name)
            timings[f"train/{spec.name}/seed{seed}"] = time.perf_counter() - start
        bar.advance()
    return timings


def evaluate_stage(
    specs: list[ArmSpec],
    seeds: list[int],
    settings: ArmsSettings,
    out_dir: Path,
    *,
    model_name: str | None = None,
    bar: StageProgress | None = None,
) -> dict[str, float]:
    """Stage 2: evaluate the untrained model and every trained run whose ``eval.json`` is missing; returns the
    evaluation times of this call. Needs every run's ``train.json`` (stage 1)."""
    bar = bar or StageProgress()
    eval_pairs = limited_pairs(settings.eval_pairs, settings.eval_limit)
    targets: list[tuple[str, Path, Path | None]] = [("untrained", out_dir / "runs" / "untrained", None)]
    for spec, seed in _jobs(specs, seeds):
        run_dir = _run_dir(out_dir, spec, seed)
        adapter = run_dir / json.loads((run_dir / TRAIN_DONE).read_text())["adapter"]
        targets.append((f"{spec.name} seed {seed}", run_dir, adapter))
    timings: dict[str, float] = {}
    for label, run_dir, adapter in targets:
        if not (run_dir / EVAL_DONE).exists():
            run_dir.mkdir(parents=True, exist_ok=True)

            def describe(condition: str, label: str = label) -> None:
                bar.describe(f"eval {label}: {condition}")

            start = time.perf_counter()
            result = _eval_run(model_name, adapter, eval_pairs, settings, describe)
            result["seconds"] = time.perf_counter() - start
            timings[f"eval/{label}"] = result["seconds"]
            write_json(run_dir / EVAL_DONE, result)
        bar.advance()
    return timings


def report_stage(
    specs: list[ArmSpec],
    seeds: list[int],
    settings: ArmsSettings,
    out_dir: Path,
    *,
    model_name: str | None = None,
    quick: bool = False,
    timings: dict[str, float] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Stage 3: statistics over the finished runs, ``arms.json``, figures, ``report.md`` and ``report.html``;
    returns the ``arms.json`` payload (``timings``: this invocation's stage times, recorded in it)."""
    console = console or Console()
    untrained = json.loads((out_dir / "runs" / "untrained" / EVAL_DONE).read_text())
    runs = []
    for spec, seed in _jobs(specs, seeds):
        run_dir = _run_dir(out_dir, spec, seed)
        train = json.loads((run_dir / TRAIN_DONE).read_text())
        retention = json.loads((run_dir / "retention.json").read_text())
        runs.append(
            {
                "arm": spec.name,
                "recipe": spec.recipe,
                "lambda": spec.lam,
                "seed": seed,
                "dir": str(run_dir.relative_to(out_dir)),
                "train": {k: v for k, v in train.items() if k != "monitor"},
                "monitor": train["monitor"],
                "retention_callback": retention["history"],
                "eval": json.loads((run_dir / EVAL_DONE).read_text()),
            }
        )
    tables = {
        "retention_condition": RETENTION_CONDITION,
        "table3": arm_table(runs, untrained),
        "table4": retention_table(runs, untrained),
        "table5": causal_table(runs, untrained),
        "forecast": forecast(runs),
    }
    result = {
        "model": model_name or "default:SmolLM2-135M-Instruct",
        "arms": [s.name for s in specs],
        "seeds": seeds,
        "quick": quick,
        "settings": settings.as_dict(),
        "eval_pairs": settings.eval_pairs,
        "eval_n": len(limited_pairs(settings.eval_pairs, settings.eval_limit)),
        "tables": tables,
        "untrained": _without_items(untrained),
        "runs": [{**r, "eval": _without_items(r["eval"])} for r in runs],
        "timings_this_invocation_s": dict(timings or {}),
    }
    write_json(out_dir / "arms.json", result)
    figures = [
        save_figure(retention_figure(tables["table4"]), out_dir / "retention.png"),
        save_figure(monitor_figure(runs, tables["forecast"]), out_dir / "monitor.png"),
    ]
    report = build_tables(json.loads((out_dir / "arms.json").read_text()))
    (out_dir / "report.md").write_text(render_markdown(result, report, [f.name for f in figures]))
    (out_dir / "report.html").write_text(render_html(result, report, figures))
    for table in report:
        console.print(rich_table(table))
    console.print(f"wrote {out_dir / 'arms.json'}, report.md, report.html, retention.png, monitor.png")
    return result


def _run_dir(out_dir: Path, spec: ArmSpec, seed: int) -> Path:
    """Where one arm × seed is trained and evaluated."""
    return out_dir / "runs" / spec.name / f"seed{seed}"


def _without_items(ev: dict[str, Any]) -> dict[str, Any]:
    """An eval record without per-item vectors (those stay in each run's ``eval.json``)."""
    out = {k: v for k, v in ev.items() if k not in ("items", "ids")}
    out["conditions"] = {k: {kk: vv for kk, vv in v.items() if kk != "correct"} for k, v in ev["conditions"].items()}
    return out
