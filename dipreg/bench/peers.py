"""`dipreg bench --peers`: dipreg's logit and causal lenses next to TransformerLens, nnsight and nnterp.

On the same pairs, token ids, candidates, neutral prompt and model, in one process: the wall time of each
(tool, lens) is the median of ``repeats`` runs after a warm-up, the runs of all tools interleaved so that a change in
machine load reaches every tool alike. The peak resident memory each adds to run its lens once is measured in a
fresh process per tool (:mod:`~dipreg.bench.peers_worker`). Correctness is read against the model's own output:
every context run alone through the causal LM, the margin of its output logits.

The floor every logit lens stands on is timed with them: the model's decoder stack alone (no head, no lens) on the
same left-padded batches, ``peer_backbone_forward_s``. A lens that reads every layer of every context cannot
cost less than that forward unless it runs fewer tokens; dipreg does, by running the prefix every context shares (a
chat template's system and user header) once into a key/value cache.

The peers' installs are optional (the ``peers`` extra): a tool whose packages are absent, or fail to import, is
skipped with a one-line notice, and the whole section is skipped with one when no peer can run. Reports ratios
only; asserts nothing about time.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from dipreg import metrics
from dipreg.adapter import ModelAdapter
from dipreg.bench.core import BenchContext, Ratio, time_median
from dipreg.bench.peers_tools import TOOLS, PeerInputs, PeerRunner, PeerTool, peer_inputs
from dipreg.stimuli import load_pairs, save_pairs
from dipreg.trajectory import trajectories_by_lens

#: A last-layer margin farther than this from the model's own output margin is an error.
MAX_ERR = 1e-4
#: Two tools disagree on an item's max_wrong_dip when they differ by more than this.
DIP_TOLERANCE = 1e-3
#: Targets: dipreg's speedup over each peer and its added memory as a share of the peer's.
SPEEDUP_TARGET = {"logit": 5.0, "causal": 10.0}
MEMORY_TARGET = 0.2
#: The probe `DipMonitor` runs by default (its ``pairs``, ``lenses`` and ``batch_size`` defaults; a test pins them).
MONITOR_PAIRS = "core"
MONITOR_LENSES = ("logit", "causal")
MONITOR_BATCH = 16

Key = tuple[str, str]  # (tool, lens)
#: The timed floor: the decoder stack alone on the peers' batches (not a tool; no margins, no memory run).
FLOOR: Key = ("backbone", "forward")


@dataclass
class Measured:
    """One (tool, lens): its margins ``(2N, L)``, median seconds, and the memory its run added (MiB)."""

    margins: Tensor
    seconds: float
    added_mb: float = float("nan")
    setup_mb: float = float("nan")
    first_run_mb: float = float("nan")


def peers_to_run() -> tuple[list[PeerTool], list[str]]:
    """The peers whose packages are installed, and a one-line notice for each that is not."""
    ready, notices = [], []
    for tool in TOOLS.values():
        if tool.name == "dipreg":
            continue
        missing = tool.missing()
        if missing:
            notices.append(f"bench peers: {tool.name} skipped ({', '.join(missing)} not installed)")
        else:
            ready.append(tool)
    return ready, notices


@torch.no_grad()
def backbone_forward(adapter: ModelAdapter, inputs: PeerInputs) -> Tensor:
    """The decoder stack alone (no head, no lens) on every left-padded batch: the forward every logit lens runs."""
    with adapter.eval_mode():
        for batch in inputs.batches:
            adapter.backbone(
                input_ids=batch.input_ids.to(adapter.input_device),
                attention_mask=batch.attention_mask.to(adapter.input_device),
            )
    return torch.empty(0)


@torch.no_grad()
def own_output_margins(adapter: ModelAdapter, inputs: PeerInputs) -> Tensor:
    """``(2N,)`` the model's own output margin of every context, each run alone (no padding) through the LM."""
    out = torch.empty(inputs.num_contexts)
    with adapter.eval_mode():
        for i, ids in enumerate(inputs.encoded):
            logits = adapter.causal_lm(input_ids=torch.tensor([ids], device=adapter.device)).logits[0, -1]
            out[i] = (logits[inputs.pos_ids[i]] - logits[inputs.neg_ids[i]]).float()
    return out


def time_interleaved(jobs: dict[Key, Callable[[], Tensor]], repeats: int) -> dict[Key, Measured]:
    """Run every job once (warm-up; its result is kept), then ``repeats`` rounds of every job in turn; median times."""
    results = {key: fn() for key, fn in jobs.items()}
    times: dict[Key, list[float]] = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, fn in jobs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: Measured(results[key], statistics.median(times[key])) for key in jobs}


def measure_memory(ctx: BenchContext, inputs: PeerInputs, keys: list[Key]) -> dict[Key, dict[str, float]]:
    """Run :mod:`~dipreg.bench.peers_worker` once per (tool, lens) on a saved copy of the model and the pairs."""
    adapter = ctx.adapter
    dtype = str(adapter.lm_head.weight.dtype).removeprefix("torch.")
    out = {}
    with tempfile.TemporaryDirectory(prefix="dipreg-peers-") as tmp:
        adapter.causal_lm.save_pretrained(tmp)
        ctx.tokenizer.save_pretrained(tmp)
        pairs_file = Path(tmp) / "pairs.jsonl"
        save_pairs(inputs.pairs, pairs_file)
        for tool, lens in keys:
            command = [
                sys.executable, "-m", "dipreg.bench.peers_worker", tmp, str(pairs_file), "--tool", tool,
                "--lens", lens, "--batch-size", str(inputs.batch_size), "--neutral-prompt", inputs.neutral_prompt,
                "--dtype", dtype, "--device", str(adapter.device),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory worker for {tool}/{lens} failed:\n{done.stderr[-2000:]}")
            out[(tool, lens)] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _build_runners(ctx: BenchContext, inputs: PeerInputs, peers: list[PeerTool]) -> tuple[dict, dict, list[str]]:
    """dipreg's runner and each peer's (on its own copy of the model); build seconds; notices for failed imports."""
    from dipreg.bench.peers_tools import DipregRunner

    runners: dict[str, PeerRunner] = {"dipreg": DipregRunner(ctx.model, ctx.tokenizer, inputs)}
    setup_s: dict[str, float] = {"dipreg": 0.0}
    notices = []
    for tool in peers:
        start = time.perf_counter()
        try:
            runners[tool.name] = tool.build(copy.deepcopy(ctx.adapter.causal_lm), ctx.tokenizer, inputs)
        except ImportError as err:
            notices.append(f"bench peers: {tool.name} skipped (import failed: {err})")
            continue
        setup_s[tool.name] = time.perf_counter() - start
    return runners, setup_s, notices


def _dips(margins: Tensor) -> Tensor:
    """max_wrong_dip of every pair from interleaved ``(2N, L)`` margins."""
    return metrics.max_wrong_dip(margins[0::2] - margins[1::2])


def _ratio(name: str, value: float, target: float | None = None, above: bool = True, detail: str = "") -> Ratio:
    if target is None:
        return Ratio(name, value, "", None, detail)
    met = value >= target if above else value <= target
    return Ratio(name, value, f"{'>=' if above else '<='} {target:g}", bool(met), detail)


def tool_ratios(key: Key, m: Measured, ref: Measured, own: Tensor, ref_dips: Tensor, inputs: PeerInputs) -> list[Ratio]:
    """The raw numbers of one (tool, lens) and, for a peer, its ratios to dipreg's run of the same lens."""
    tool, lens = key
    stem = f"peer_{tool}_{lens}"
    errors = (m.margins[:, -1] - own).abs()
    max_err = float(errors.max()) if bool(errors.isfinite().all()) else float("inf")
    above = int((~(errors <= MAX_ERR)).sum())
    mismatch = float((~((_dips(m.margins) - ref_dips).abs() <= DIP_TOLERANCE)).float().mean())
    contexts = f"{inputs.num_contexts} contexts"
    rows = [
        _ratio(f"{stem}_seconds", m.seconds, detail=f"median wall time on {contexts}"),
        _ratio(
            f"{stem}_added_mb",
            m.added_mb,
            detail=f"peak resident memory added by a second run; build {m.setup_mb:.0f} MB",
        ),
        _ratio(
            f"{stem}_first_run_mb",
            m.first_run_mb,
            detail="the same for the first run (adds the pages the libraries touch for the first time)",
        ),
        _ratio(
            f"{stem}_max_err",
            max_err,
            MAX_ERR if tool == "dipreg" else None,
            above=False,
            detail=f"max |last-layer margin − model output margin|; {above} of {contexts} > {MAX_ERR:g}",
        ),
    ]
    if tool == "dipreg":
        return rows
    speedup = m.seconds / ref.seconds
    memory = ref.added_mb / m.added_mb if m.added_mb > 0 else float("inf")
    return [
        *rows,
        _ratio(
            f"{stem}_dip_mismatch",
            mismatch,
            detail=f"share of pairs whose max_wrong_dip differs from dipreg's by > {DIP_TOLERANCE:g}",
        ),
        _ratio(
            f"{stem}_speedup",
            speedup,
            SPEEDUP_TARGET[lens],
            detail=f"{tool} {m.seconds:.3f}s / dipreg {ref.seconds:.3f}s",
        ),
        _ratio(
            f"{stem}_memory_ratio",
            memory,
            MEMORY_TARGET,
            above=False,
            detail=f"dipreg {ref.added_mb:.1f} MB / {tool} {m.added_mb:.1f} MB added (second run)",
        ),
        _ratio(
            f"{stem}_first_run_memory_ratio",
            ref.first_run_mb / m.first_run_mb if m.first_run_mb > 0 else float("inf"),
            detail=f"dipreg {ref.first_run_mb:.1f} MB / {tool} {m.first_run_mb:.1f} MB added (first run)",
        ),
    ]


def floor_ratio(seconds: float, measured: dict[Key, Measured], inputs: PeerInputs) -> Ratio:
    """``peer_backbone_forward_s``: the decoder stack alone on the peers' batches, with every logit lens's
    time as a multiple of it in the detail (a lens that runs every token costs at least one such forward)."""
    multiples = ", ".join(
        f"{tool} {m.seconds / seconds:.2f}×" for (tool, lens), m in measured.items() if lens == "logit"
    )
    detail = f"decoder stack alone on {inputs.num_contexts} contexts (logit lens = floor × {multiples})"
    return _ratio("peer_backbone_forward_s", seconds, detail=detail)


def monitor_probe_ratios(ctx: BenchContext, measured: dict[Key, Measured], inputs: PeerInputs) -> list[Ratio]:
    """One `DipMonitor` probe at its defaults: dipreg timed on the monitor's pair count; each peer's cost for the
    lenses it offers, extrapolated from its timed runs (same batch size, so the cost grows with the batch count)."""
    probe_pairs = ctx.pairs[: len(load_pairs(MONITOR_PAIRS))]

    def probe(lenses: tuple[str, ...]) -> Callable[[], object]:
        return lambda: trajectories_by_lens(
            ctx.model, ctx.tokenizer, probe_pairs, list(lenses), batch_size=MONITOR_BATCH
        )

    full = time_median(probe(MONITOR_LENSES), ctx.repeats)
    logit_only = time_median(probe(("logit",)), ctx.repeats)
    scale = len(probe_pairs) / len(inputs.pairs)
    rows = [
        _ratio(
            "peer_monitor_probe_dipreg_s",
            full,
            detail=f"{len(probe_pairs)} pairs, lenses {'+'.join(MONITOR_LENSES)}, measured",
        ),
        _ratio(
            "peer_monitor_probe_dipreg_logit_s",
            logit_only,
            detail=f"{len(probe_pairs)} pairs, logit lens only, measured",
        ),
    ]
    for tool in dict.fromkeys(t for t, _ in measured if t != "dipreg"):
        lenses = tuple(lens for lens in MONITOR_LENSES if (tool, lens) in measured)
        cost = scale * sum(measured[(tool, lens)].seconds for lens in lenses)
        ref = full if lenses == MONITOR_LENSES else logit_only
        how = f"{'+'.join(lenses)}, extrapolated ×{scale:.2f} from {len(inputs.pairs)} pairs"
        rows.append(_ratio(f"peer_monitor_probe_{tool}_s", cost, detail=how))
        rows.append(
            _ratio(
                f"peer_monitor_probe_{tool}_speedup",
                cost / ref,
                detail=f"{tool} {cost:.2f}s / dipreg {ref:.2f}s ({'+'.join(lenses)})",
            )
        )
    return rows


def peers_table(measured: dict[Key, Measured], ratios: list[Ratio], setup_s: dict[str, float]) -> Table:
    """The side-by-side table: one row per (tool, lens)."""
    values = {r.name: r.value for r in ratios}
    table = Table(title="dipreg bench --peers (speedup and memory ratio: dipreg against the row's tool)")
    for column in (
        "tool",
        "lens",
        "seconds",
        "speedup",
        "added MB (2nd run)",
        "memory ratio",
        "added MB (1st run)",
        "build s",
        "max err",
        "dip mismatch",
    ):
        table.add_column(column)
    for (tool, lens), m in measured.items():
        stem = f"peer_{tool}_{lens}"
        fmt = lambda name, spec: "—" if name not in values else format(values[name], spec)  # noqa: E731
        table.add_row(
            tool, lens, f"{m.seconds:.3f}", fmt(f"{stem}_speedup", ".1f"), f"{m.added_mb:.1f}",
            fmt(f"{stem}_memory_ratio", ".3f"), f"{m.first_run_mb:.1f}", f"{setup_s[tool]:.1f}",
            fmt(f"{stem}_max_err", ".2e"), fmt(f"{stem}_dip_mismatch", ".2f"),
        )  # fmt: skip
    if "peer_backbone_forward_s" in values:
        floor = values["peer_backbone_forward_s"]
        table.add_row("(decoder stack alone)", "floor", f"{floor:.3f}", *["—"] * 7)
    return table


def peers_section(ctx: BenchContext, num_pairs: int | None = None) -> list[Ratio]:
    """dipreg against every installed peer on the first ``num_pairs`` pairs (default: all); see the module
    docstring."""
    peers, notices = peers_to_run()
    for notice in notices:
        print(notice)
    if not peers:
        print("bench peers: section skipped (install the peers extra: transformer-lens, nnsight, nnterp)")
        return []
    inputs = peer_inputs(ctx.tokenizer, ctx.pairs[:num_pairs], ctx.batch_size)
    runners, setup_s, failed = _build_runners(ctx, inputs, peers)
    for notice in failed:
        print(notice)
    if len(runners) == 1:
        print("bench peers: section skipped (no peer could be imported)")
        return []
    jobs = {
        (name, lens): (lambda r=runner, lens=lens: r.margins(lens))
        for name, runner in runners.items()
        for lens in runner.lenses
    }
    jobs[FLOOR] = lambda: backbone_forward(ctx.adapter, inputs)
    print(
        f"bench peers: timing {len(jobs) - 1} (tool, lens) runs and the bare decoder stack on "
        f"{inputs.num_contexts} contexts, {ctx.repeats} repeats"
    )
    measured = time_interleaved(jobs, ctx.repeats)
    floor = measured.pop(FLOOR)
    print("bench peers: measuring memory, one fresh process per (tool, lens)")
    for key, memory in measure_memory(ctx, inputs, list(measured)).items():
        m = measured[key]
        m.added_mb, m.setup_mb, m.first_run_mb = memory["added_mb"], memory["setup_mb"], memory["first_run_mb"]
    own = own_output_margins(ctx.adapter, inputs)
    ratios: list[Ratio] = [floor_ratio(floor.seconds, measured, inputs)]
    for (tool, lens), m in measured.items():
        ref = measured[("dipreg", lens)]
        ratios += tool_ratios((tool, lens), m, ref, own, _dips(ref.margins), inputs)
    ratios += [
        _ratio(f"peer_{name}_setup_s", seconds, detail="building the tool on a copy of the model")
        for name, seconds in setup_s.items()
        if name != "dipreg"
    ]
    print("bench peers: timing one DipMonitor probe at its defaults")
    ratios += monitor_probe_ratios(ctx, measured, inputs)
    Console(width=132).print(peers_table(measured, ratios, setup_s))  # wide enough when piped to a log
    return ratios
