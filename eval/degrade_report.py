"""`dipreg degrade`: measure the intact model once, then each degradation -> table, degrade.json, figure.

The dip and the margin are always read on the intact model; each degraded run uses the same prompts through
``dipreg.trajectories``. After every operator the model's checksum is compared with the intact one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.eval import stats
from dipreg.eval.figures import tertile_flip_figure
from dipreg.eval.ledger import check_restored, state_checksum
from dipreg.eval.operators import DEFAULT_OPS, degrade, op_label, parse_ops
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.models import load_model
from dipreg.plots import save_figure
from dipreg.prompting import PromptFormat
from dipreg.stimuli import load_pairs
from dipreg.trajectory import Trajectories, trajectories


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def operator_result(intact: Trajectories, degraded: Trajectories) -> dict[str, Any]:
    """Accuracy, flips, McNemar, paired t on DiD(L), and dip / margin stratification of one degraded run."""
    dip = intact.max_wrong_dip.numpy()
    margin = intact.did[:, -1].abs().numpy()
    before, after = intact.correct.numpy(), degraded.correct.numpy()
    flip = stats.flips(before, after)
    return {
        "accuracy": float(after.mean()),
        "strict_accuracy": float(degraded.strict_correct.float().mean()),
        "n_flips": int(flip.sum()),
        "n_rescued": int((~before & after).sum()),
        "mcnemar": stats.mcnemar_exact(before, after),
        "final_did_paired_t": stats.paired_t(intact.did[:, -1].numpy(), degraded.did[:, -1].numpy()),
        "stratification": {"dip": stats.stratify(dip, before, after), "margin": stats.stratify(margin, before, after)},
        "items": {"correct": after.tolist(), "final_did": degraded.did[:, -1].tolist(), "flip": flip.tolist()},
    }


def results_table(title: str, intact_acc: float, results: dict[str, dict[str, Any]]) -> Table:
    """One row per operator: accuracy, flips, high/low tertile flip rates, Mann–Whitney p and Spearman ρ of the
    intact dip and of the intact margin |DiD(L)|, McNemar p (intact vs degraded). Everything is in the JSON."""
    table = Table(title=title)
    columns = ["operator", "acc", "flips", "dip hi/lo", "dip p", "dip ρ", "marg hi/lo", "marg p", "marg ρ", "McN p"]
    for column in columns:
        if column == "operator":
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right", no_wrap=True)
    table.add_row("intact", f"{intact_acc:.3f}", "-", *["-"] * (len(columns) - 3))
    for label, res in results.items():
        dip, mar = res["stratification"]["dip"], res["stratification"]["margin"]
        table.add_row(
            label,
            f"{res['accuracy']:.3f}",
            str(res["n_flips"]),
            f"{_fmt(dip['high_tertile_flip_rate'], '.2f')}/{_fmt(dip['low_tertile_flip_rate'], '.2f')}",
            _fmt(dip["mw_p"], ".2g"),
            _fmt(dip["spearman_rho"], ".2f"),
            f"{_fmt(mar['high_tertile_flip_rate'], '.2f')}/{_fmt(mar['low_tertile_flip_rate'], '.2f')}",
            _fmt(mar["mw_p"], ".2g"),
            _fmt(mar["spearman_rho"], ".2f"),
            _fmt(res["mcnemar"]["p"], ".2g"),
        )
    return table


def run_degrade(
    model_name: str | None,
    pairs_name: str,
    ops: str = DEFAULT_OPS,
    out: str | Path = "runs/degrade",
    *,
    batch_size: int = 16,
    window: tuple[float, float] = DEFAULT_WINDOW,
    prompt: str = "auto",
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every operator of ``ops`` (CLI spec) on the model, write ``degrade.json`` and
    ``tertile_flips.png`` into ``out``, print the table, and return the JSON payload."""
    console = console or Console()
    specs = parse_ops(ops)
    out_dir = prepare_out_dir(out)
    pairs = load_pairs(pairs_name)
    model, tokenizer = load_model(model_name)
    prompt_format = PromptFormat(prompt)  # type: ignore[arg-type]

    def measure() -> Trajectories:
        return trajectories(
            model, tokenizer, pairs, batch_size=batch_size, window=window, prompt=prompt_format, progress=True
        )

    checksum = state_checksum(model)
    start = time.perf_counter()
    intact = measure()
    timings = {"intact_s": time.perf_counter() - start}
    results: dict[str, dict[str, Any]] = {}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("operators", total=len(specs))
        for name, params in specs:
            label = op_label(name, params)
            bar.update(task, description=f"degrade {label}")
            start = time.perf_counter()
            with degrade(model, name, **params) as report:
                degraded = measure()
            check_restored(model, checksum, label)
            results[label] = {**operator_result(intact, degraded), "operator": report.as_dict()}
            results[label]["seconds"] = time.perf_counter() - start
            bar.advance(task)
    payload = {
        "model": model_name or "default:SmolLM2-135M-Instruct",
        "pairs": str(pairs_name),
        "num_pairs": len(pairs),
        "num_layers": intact.num_layers,
        "window": list(window),
        "prompt": prompt_format.resolved(tokenizer),
        "ops": ops,
        "intact": {
            "checksum": checksum,
            "summary": intact.summary(),
            "items": {
                "id": [p.id for p in pairs],
                "family": [p.family for p in pairs],
                "correct": intact.correct.tolist(),
                "max_wrong_dip": intact.max_wrong_dip.tolist(),
                "final_did": intact.did[:, -1].tolist(),
            },
        },
        "operators": results,
        "restored_checksum_verified": True,
        "timings": timings,
    }
    write_json(out_dir / "degrade.json", payload)
    save_figure(tertile_flip_figure(results, "dip"), out_dir / "tertile_flips.png")
    title = f"dipreg degrade — {payload['model']} on {pairs_name} (n={len(pairs)}; dip & margin from the intact model)"
    console.print(results_table(title, payload["intact"]["summary"]["all"]["accuracy"], results))
    console.print(f"wrote {out_dir / 'degrade.json'} and {out_dir / 'tertile_flips.png'}")
    return payload
