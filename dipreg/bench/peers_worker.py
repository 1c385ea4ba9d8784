"""Peak resident memory one tool adds to run one lens, measured in a fresh process (``dipreg bench --peers``).

``python -m dipreg.bench.peers_worker MODEL_DIR PAIRS_FILE --tool T --lens L ...`` loads the saved model, builds the
tool on it (its imports and wrapper are the ``setup`` cost), resets the kernel's high-water mark of the process's
resident set (``/proc/self/clear_refs``), runs the lens once and prints one JSON line: ``setup_mb`` (resident memory
the build added) and ``added_mb`` (peak resident memory during the run minus resident memory before it). A fresh
process per tool keeps one tool's caches and imports out of the next one's number. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from dipreg.lenses.causal import DEFAULT_NEUTRAL_PROMPT

_STATUS = Path("/proc/self/status")


def resident_kib() -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak since start or the last reset) of this process, in KiB."""
    text = _STATUS.read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) for key in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux ≥ 4.0: writing 5 to ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(
    model_dir: str, pairs_file: str, tool: str, lens: str, batch_size: int, neutral_prompt: str, dtype: str, device: str
) -> dict[str, float]:
    """Load, build, reset the peak, run once; the memory the build and the run added, in MiB."""
    import torch

    from dipreg.bench.peers_tools import TOOLS, peer_inputs
    from dipreg.models import load_model
    from dipreg.stimuli import load_pairs

    model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    inputs = peer_inputs(tokenizer, load_pairs(pairs_file), batch_size, neutral_prompt=neutral_prompt)
    before_build = resident_kib()["VmRSS"]
    runner = TOOLS[tool].build(model, tokenizer, inputs)
    reset_peak()
    before_run = resident_kib()["VmRSS"]
    with torch.no_grad():
        runner.margins(lens)
    peak = resident_kib()["VmHWM"]
    return {"setup_mb": (before_run - before_build) / 1024, "added_mb": (peak - before_run) / 1024}


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, measure, print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("pairs_file")
    p.add_argument("--tool", required=True)
    p.add_argument("--lens", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--neutral-prompt", default=DEFAULT_NEUTRAL_PROMPT)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    result = measure(
        args.model_dir,
        args.pairs_file,
        args.tool,
        args.lens,
        args.batch_size,
        args.neutral_prompt,
        args.dtype,
        args.device,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
