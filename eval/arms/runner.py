"""`dipreg arms`: train the recipe arms × seeds with the monitor on, evaluate each under compression, report.

Stages, each resumable (a finished piece leaves a marker file and is skipped on the next run):

1. :func:`train_stage`: train every arm × seed (:func:`~dipreg.eval.arms.train.train_arm`, through the same
   LightningCLI as `dipreg fit`; marker ``runs/<arm>/seed<k>/train.json``);
2. :func:`evaluate_stage`: evaluate the untrained model and every run
   (:func:`~dipreg.eval.arms.evaluate.evaluate_model`; marker ``eval.json``);
3. :func:`report_stage`: statistics (:mod:`~dipreg.eval.arms.stats`), ``arms.json``, figures, ``report.md`` and
   ``report.html``.

``arms_config.json`` records the settings; resuming into a folder made with other settings is refused, naming each
field that changed with its old and new value. Every marker is written atomically
(:func:`dipreg.artifacts.write_json`), so a killed run leaves a marker whole or absent; a marker that is still
damaged (truncated, not JSON, missing a field) is named and its unit runs again, and a unit that trains again
starts from an empty run folder (no TensorBoard events, adapter or ``eval.json`` of the earlier attempt).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.eval.arms.evaluate import evaluate_model, general_texts, load_arm_model
from dipreg.eval.arms.figures import monitor_figure, retention_figure
from dipreg.eval.arms.plan import ARM_RECIPES, DEFAULT_ARMS, ArmSpec, ArmsSettings, build_arms, check_seeds
from dipreg.eval.arms.report import build_tables, render_html, render_markdown, rich_table
from dipreg.eval.arms.stats import RETENTION_CONDITION, arm_table, causal_table, forecast, retention_table
from dipreg.eval.arms.train import TRAIN_DONE, limited_pairs, train_arm
from dipreg.eval.arms.tuned import ensure_tuned_lens
from dipreg.plots import save_figure

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_SEEDS",
    "EVAL_DONE",
    "RETENTION_FILE",
    "MarkerError",
    "completed_jobs",
    "evaluate_stage",
    "read_marker",
    "report_completed",
    "report_stage",
    "run_arms",
    "train_stage",
]

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_LAMBDAS = (0.2,)
EVAL_DONE = "eval.json"
CONFIG_FILE = "arms_config.json"
#: CompressionRetention's history of one run (written by train_arm before train.json).
RETENTION_FILE = "retention.json"
#: The fields a marker must hold to count as finished (what the later stages read from it).
MARKER_FIELDS: dict[str, tuple[str, ...]] = {
    TRAIN_DONE: ("adapter", "monitor", "steps"),
    RETENTION_FILE: ("history",),
    EVAL_DONE: ("n", "summary", "conditions"),
    CONFIG_FILE: ("model", "quick", "settings"),
}


class MarkerError(ValueError):
    """A marker file of `dipreg arms` that is not a complete JSON record (truncated, not JSON, missing a field)."""


def read_marker(path: Path) -> dict[str, Any] | None:
    """The JSON object of marker ``path`` (``None`` when there is no such file).

    A file that is not UTF-8 JSON, not an object, or lacks a field of :data:`MARKER_FIELDS` raises
    :class:`MarkerError` naming the file and the problem.
    """
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MarkerError(f"{path} is not a complete JSON record ({err})") from err
    if not isinstance(record, dict):
        raise MarkerError(f"{path} holds a JSON {type(record).__name__}, not an object")
    missing = [key for key in MARKER_FIELDS.get(path.name, ()) if key not in record]
    if missing:
        raise MarkerError(f"{path} lacks the field(s) {', '.join(missing)}")
    return record


def _note(console: Console | None, text: str) -> None:
    """A one-line note on the run's console (markup-safe: paths are printed as they are)."""
    (console or Console()).print(Text.assemble(("note:", "yellow"), " ", text))


def _finished(path: Path, what: str, console: Console | None) -> dict[str, Any] | None:
    """The record of marker ``path``, or ``None`` when ``what`` must run (no marker, or a damaged one: noted)."""
    try:
        return read_marker(path)
    except MarkerError as err:
        _note(console, f"{err}; {what} runs again.")
        return None


def _show(value: Any) -> str:
    """A setting's value as JSON text (``null``, ``"strict240"``, ``15``)."""
    return json.dumps(value, ensure_ascii=False)


_ABSENT = object()


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field: old → new`` for every setting that differs (``settings`` fields by their own name)."""

    def flat(config: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in config.items() if k != "settings"}
        settings = config.get("settings")
        return {**out, **(settings if isinstance(settings, dict) else {"settings": settings})}

    def text(value: Any) -> str:
        return "(absent)" if value is _ABSENT else _show(value)

    before, after = flat(old), flat(new)
    keys = [*after, *(k for k in before if k not in after)]
    pairs = [(key, before.get(key, _ABSENT), after.get(key, _ABSENT)) for key in keys]
    return [f"{key}: {text(a)} → {text(b)}" for key, a, b in pairs if a != b]


def _check_config(out_dir: Path, config: dict[str, Any]) -> None:
    """Write ``arms_config.json``, or check a resumed run's against ``config``: a changed setting is refused with
    every changed field, its old and its new value; a damaged file is refused with what to do."""
    path = out_dir / CONFIG_FILE
    try:
        old = read_marker(path)
    except MarkerError as err:
        raise ValueError(
            f"{err}: it records the settings the runs in {out_dir} were made with, so resuming cannot check them. "
            f"Pass a new --out, or delete {path} only if the runs there were made with these same options."
        ) from err
    if old is None:
        write_json(path, config)
        return
    changes = _config_changes(old, config)
    if changes:
        raise ValueError(
            f"{out_dir} holds an arms run with different settings ({path}): {'; '.join(changes)}. Resume with the "
            "same options, or pass a new --out."
        )


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
        arms: arm names from :data:`~dipreg.eval.arms.plan.ARM_RECIPES` (default:
            :data:`~dipreg.eval.arms.plan.DEFAULT_ARMS`, the paper's three).
        lambdas: hinge weights; every hinge arm (``dip_reg``, ``dip_reg_causal``, ``dip_reg_tuned``) trains one
            arm per λ (default: 0.2). ``dip_reg_tuned`` reads the run's tuned lens, trained once into
            ``<out>/tuned-lens/`` (:func:`~dipreg.eval.arms.tuned.ensure_tuned_lens`).
        seeds: training seeds (default: 0, 1, 2).
        quick: CI-sized smoke run (:meth:`ArmsSettings.quick`).
        out: output folder.
        **overrides: :class:`ArmsSettings` fields to change (``None`` values are ignored).
    """
    console = console or Console()
    # Every option is checked before the output folder is made and any model loads.
    settings = (ArmsSettings.quick() if quick else ArmsSettings()).with_overrides(**overrides)
    specs: list[ArmSpec] = build_arms(list(arms or DEFAULT_ARMS), list(lambdas or DEFAULT_LAMBDAS))
    seeds = check_seeds(list(DEFAULT_SEEDS if seeds is None else seeds))
    settings.check_pair_sets()
    if "output_only" not in [s.name for s in specs]:
        console.print("[yellow]note:[/] no output_only arm: the McNemar columns (vs output_only) stay empty.")
    out_dir = prepare_out_dir(out)
    _check_config(out_dir, {"model": model_name, "quick": quick, "settings": settings.as_dict()})
    timings: dict[str, float] = {}
    if any(spec.needs_tuned_lens() for spec in specs):
        lens_path, seconds = ensure_tuned_lens(out_dir, model_name, quick=quick, console=console)
        specs = [replace(s, tuned_lens=str(lens_path)) if s.needs_tuned_lens() else s for s in specs]
        if seconds:
            timings["tuned_lens_train"] = seconds
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = StageProgress(progress, progress.add_task("arms", total=2 * len(specs) * len(seeds) + 1))
        timings |= train_stage(specs, seeds, settings, out_dir, model_name=model_name, bar=bar, console=console)
        timings |= evaluate_stage(specs, seeds, settings, out_dir, model_name=model_name, bar=bar, console=console)
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
    console: Console | None = None,
) -> dict[str, float]:
    """Stage 1: train every arm × seed that is not finished; returns the training times of this call.

    A run is finished when its ``train.json`` and ``retention.json`` are complete records and its adapter folder
    exists; a damaged marker is named on the console. A run that trains (again) first loses its whole run folder,
    so no TensorBoard events, adapter or ``eval.json`` of an earlier, interrupted attempt mix with the new ones.
    """
    bar = bar or StageProgress()
    timings: dict[str, float] = {}
    for spec, seed in _jobs(specs, seeds):
        run_dir = _run_dir(out_dir, spec, seed)
        if not _trained(run_dir, f"training {spec.name} seed {seed}", console):
            if run_dir.exists():
                shutil.rmtree(run_dir)
            bar.describe(f"train {spec.name} seed {seed}")
            start = time.perf_counter()
            train_arm(spec, seed, settings, run_dir, model_name=model_name)
            timings[f"train/{spec.name}/seed{seed}"] = time.perf_counter() - start
        bar.advance()
    return timings


def _trained(run_dir: Path, what: str, console: Console | None) -> bool:
    """Whether the run in ``run_dir`` finished training (see :func:`train_stage`); damaged markers are noted."""
    record = _finished(run_dir / TRAIN_DONE, what, console)
    if record is None:
        return False
    if _finished(run_dir / RETENTION_FILE, what, console) is None:
        return False
    adapter = run_dir / str(record["adapter"])
    if not adapter.is_dir():
        _note(console, f"{run_dir / TRAIN_DONE} names the adapter {adapter}, which is missing; {what} runs again.")
        return False
    return True


def evaluate_stage(
    specs: list[ArmSpec],
    seeds: list[int],
    settings: ArmsSettings,
    out_dir: Path,
    *,
    model_name: str | None = None,
    bar: StageProgress | None = None,
    console: Console | None = None,
) -> dict[str, float]:
    """Stage 2: evaluate the untrained model and every trained run whose ``eval.json`` is missing or damaged (a
    damaged one is named on the console); returns the evaluation times of this call. Needs every run's
    ``train.json`` (stage 1)."""
    bar = bar or StageProgress()
    eval_pairs = limited_pairs(settings.eval_pairs, settings.eval_limit)
    targets: list[tuple[str, Path, Path | None]] = [("untrained", out_dir / "runs" / "untrained", None)]
    for spec, seed in _jobs(specs, seeds):
        run_dir = _run_dir(out_dir, spec, seed)
        adapter = run_dir / str(_required(run_dir / TRAIN_DONE)["adapter"])
        targets.append((f"{spec.name} seed {seed}", run_dir, adapter))
    timings: dict[str, float] = {}
    for label, run_dir, adapter in targets:
        if _finished(run_dir / EVAL_DONE, f"the evaluation of {label}", console) is None:
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
    jobs: list[tuple[ArmSpec, int]] | None = None,
) -> dict[str, Any]:
    """Stage 3: statistics over the finished runs, ``arms.json``, figures, ``report.md`` and ``report.html``;
    returns the ``arms.json`` payload (``timings``: this invocation's stage times, recorded in it). ``jobs``: the
    arm × seed runs to report (default: every arm × every seed)."""
    console = console or Console()
    untrained = _required(out_dir / "runs" / "untrained" / EVAL_DONE)
    runs = []
    for spec, seed in jobs if jobs is not None else _jobs(specs, seeds):
        run_dir = _run_dir(out_dir, spec, seed)
        train = _required(run_dir / TRAIN_DONE)
        retention = _required(run_dir / RETENTION_FILE)
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
                "eval": _required(run_dir / EVAL_DONE),
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


def completed_jobs(out_dir: Path) -> list[tuple[ArmSpec, int]]:
    """Every arm × seed under ``out_dir/runs`` whose training and evaluation finished (complete ``train.json``,
    ``retention.json`` and ``eval.json``), ordered by arm (as in :data:`~dipreg.eval.arms.plan.ARM_RECIPES`, then
    λ) and seed."""
    order = {name: i for i, name in enumerate(ARM_RECIPES)}
    found = []
    for train_file in sorted((out_dir / "runs").glob(f"*/seed*/{TRAIN_DONE}")):
        run_dir = train_file.parent
        try:
            records = [read_marker(run_dir / name) for name in (TRAIN_DONE, RETENTION_FILE, EVAL_DONE)]
        except MarkerError:
            continue
        if any(record is None for record in records):
            continue
        train = records[0]
        spec = ArmSpec(str(train["arm"]), str(train["recipe"]), train.get("lambda"))
        found.append((spec, int(train["seed"])))
    return sorted(found, key=lambda job: (order.get(job[0].recipe, len(order)), job[0].lam or 0.0, job[0].name, job[1]))


def report_completed(out: str | Path, *, console: Console | None = None) -> dict[str, Any]:
    """Stage 3 alone over whatever finished in ``out`` (e.g. while a long run is still training, or after
    invocations with different arms and seeds into one folder): :func:`report_stage` on :func:`completed_jobs`,
    with the settings of ``arms_config.json``. Needs the untrained model's ``eval.json``."""
    out_dir = Path(out)
    config = _required(out_dir / CONFIG_FILE)
    jobs = completed_jobs(out_dir)
    if not jobs:
        raise MarkerError(f"No finished arm × seed in {out_dir / 'runs'} yet (each needs train.json and eval.json).")
    specs = list(dict.fromkeys(spec for spec, _ in jobs))
    seeds = sorted({seed for _, seed in jobs})
    settings = ArmsSettings(**config["settings"])
    return report_stage(
        specs, seeds, settings, out_dir, model_name=config["model"], quick=config["quick"], console=console, jobs=jobs
    )


def _required(path: Path) -> dict[str, Any]:
    """A marker an earlier stage guarantees; missing or damaged, a :class:`MarkerError` says to run again."""
    again = "run the same `dipreg arms` command again: the unit it marks runs again"
    try:
        record = read_marker(path)
    except MarkerError as err:
        raise MarkerError(f"{err}; {again}.") from err
    if record is None:
        raise MarkerError(f"{path} is missing; {again}.")
    return record


def _run_dir(out_dir: Path, spec: ArmSpec, seed: int) -> Path:
    """Where one arm × seed is trained and evaluated."""
    return out_dir / "runs" / spec.name / f"seed{seed}"


def _without_items(ev: dict[str, Any]) -> dict[str, Any]:
    """An eval record without per-item vectors (those stay in each run's ``eval.json``)."""
    out = {k: v for k, v in ev.items() if k not in ("items", "ids")}
    out["conditions"] = {k: {kk: vv for kk, vv in v.items() if kk != "correct"} for k, v in ev["conditions"].items()}
    return out
