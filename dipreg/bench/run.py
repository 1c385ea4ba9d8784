"""`dipreg bench`: run the sections, print the ratio table, write ``bench.json``.

Each section (one module each: ``lens``, ``causal``, ``hinge``, ``monitor``) times one part of dipreg next to its
reference measured in the same run and returns named ratios. Sections are imported only when they run, so
``dipreg bench --only lens`` never imports Lightning. Opt-in sections (:data:`OPT_IN`: ``monitor``, four LoRA fits;
``peers``, dipreg next to TransformerLens, nnsight and nnterp) run only when asked for, by name in ``--only`` (or
``--peers``). ``bench.json`` records each section's wall time (``section_seconds``).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.bench.core import BenchContext, Ratio, Section
from dipreg.models import load_model
from dipreg.stimuli import load_pairs
from dipreg.validation import validate_count

#: Section name -> ``module:function``, in the order `dipreg bench` runs them.
SECTIONS: dict[str, str] = {
    "lens": "dipreg.bench.lens:lens_section",
    "causal": "dipreg.bench.causal:causal_section",
    "hinge": "dipreg.bench.hinge:hinge_overhead_section",
    "monitor": "dipreg.bench.monitor:monitor_section",
    "peers": "dipreg.bench.peers:peers_section",
}
#: Sections left out of the default selection, and why: each runs only when named in ``--only`` (``peers`` also by
#: ``--peers``). The default sections run no Lightning fit.
OPT_IN: dict[str, str] = {
    "monitor": "four 30-step LoRA fits, about 12 min on a 2-core CPU",
    "peers": "needs the peers extra; times TransformerLens, nnsight and nnterp",
}
#: Pairs the ``peers`` section times the peers on (the first of the pair set): nnterp's patchscope runs every layer's
#: transplant as a full forward of the neutral prompt (30 forwards per batch on the default model), which makes all
#: 278 core pairs take far too long on a CPU; 8 pairs are one batch of 16 contexts.
PEERS_PAIRS = 8


def section_names(sections: Sequence[str] | None = None, peers: bool = False) -> list[str]:
    """The sections to run: ``sections`` (default: all but :data:`OPT_IN`), plus ``peers`` when ``peers`` is set."""
    names = [name for name in SECTIONS if name not in OPT_IN] if sections is None else list(sections)
    return [*names, "peers"] if peers and "peers" not in names else names


def load_sections(names: Sequence[str] | None = None) -> list[Section]:
    """The section functions for ``names`` (default: all but :data:`OPT_IN`); unknown names raise a ValueError listing
    the choices."""
    names = section_names(names)
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise ValueError(f"Unknown bench section(s) {unknown}; choose from: {', '.join(SECTIONS)}.")
    loaded = []
    for name in names:
        module, _, function = SECTIONS[name].partition(":")
        loaded.append(getattr(importlib.import_module(module), function))
    return loaded


def run_bench(
    model_name: str | None = None,
    pairs_name: str = "core",
    out: str | Path = "runs/bench",
    *,
    repeats: int = 3,
    batch_size: int = 16,
    naive_pairs: int = 32,
    sections: Sequence[str] | None = None,
    peers: bool = False,
    peers_pairs: int = PEERS_PAIRS,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the named ``sections`` (default: all of :data:`SECTIONS` but :data:`OPT_IN`, in order; ``peers`` adds the
    peers section, timed on the first ``peers_pairs`` pairs), print a table and write ``bench.json``; returns the
    payload. Bad options (counts, unknown section names, the pair set) raise a ValueError before ``out``
    is created and before the model loads."""
    validate_count(repeats, "--repeats")
    validate_count(naive_pairs, "--naive-pairs")
    validate_count(batch_size, "--batch-size")
    validate_count(peers_pairs, "--peers-pairs")
    names = section_names(sections, peers)
    chosen = load_sections(names)
    options: dict[str, dict[str, Any]] = {"peers": {"num_pairs": peers_pairs}}
    pairs = load_pairs(pairs_name)
    console = console or Console()
    out_dir = prepare_out_dir(out)
    model, tokenizer = load_model(model_name)
    ctx = BenchContext(model, tokenizer, pairs, batch_size, repeats, naive_pairs)
    ratios: list[Ratio] = []
    seconds: dict[str, float] = {}
    with console.status("benchmarking…") as status:
        for index, (name, section) in enumerate(zip(names, chosen, strict=True), start=1):
            status.update(f"benchmarking: section {name} ({index} of {len(names)})…")
            start = time.perf_counter()
            ratios.extend(section(ctx, **options.get(name, {})))
            seconds[name] = round(time.perf_counter() - start, 1)
            console.print(f"section {name} done in {seconds[name]:.0f} s ({index} of {len(names)})")
    table = Table(title=f"dipreg bench — {model_name or 'default:SmolLM2-135M-Instruct'}, {len(ctx.pairs)} pairs")
    for column in ("ratio", "value", "target", "met", "measured"):
        table.add_column(column)
    for r in ratios:
        table.add_row(r.name, f"{r.value:.3f}", r.target, "—" if r.met is None else "yes" if r.met else "NO", r.detail)
    console.print(table)
    console.print("section wall time: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in seconds.items()))
    payload: dict[str, Any] = {r.name: r.value for r in ratios}
    payload["details"] = {r.name: {"target": r.target, "met": r.met, "measured": r.detail} for r in ratios}
    payload.update(
        model=model_name or "default:SmolLM2-135M-Instruct",
        pairs=pairs_name,
        repeats=repeats,
        batch_size=batch_size,
        naive_pairs=naive_pairs,
        **({"peers_pairs": peers_pairs} if "peers" in names else {}),
        torch_threads=torch.get_num_threads(),
        section_seconds=seconds,
    )
    write_json(out_dir / "bench.json", payload)
    console.print(f"wrote {out_dir / 'bench.json'}")
    return payload
