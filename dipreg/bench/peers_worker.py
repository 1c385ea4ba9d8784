"""Peak resident memory one tool adds to run one lens, measured in a fresh process (``dipreg bench --peers``).

``python -m dipreg.bench.peers_worker MODEL_DIR PAIRS_FILE --tool T --lens L ...`` loads the saved model, builds the
tool on it (its imports and wrapper are the ``setup`` cost), then runs the lens twice, resetting the kernel's
high-water mark of the process's resident set (``/proc/self/clear_refs``) before each run, and prints one JSON line:
``setup_mb`` (resident memory the build added), ``first_run_mb`` (peak during the first run minus resident memory
before it: the lens's working memory plus every page the libraries touch for the first time, e.g. oneDNN scratch
and allocator arenas) and ``added_mb`` (the same for the second run: the working memory a lens needs each time it
runs, as in a training callback that probes again and again). A fresh process per tool keeps one tool's caches and
imports out of the next one's numbers. Linux only (``/proc``).
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
    """Load, build, then run twice with the peak reset before each run; the memory the build and each run added,
    in MiB (see the module docstring)."""
    import torch

    from dipreg.bench.peers_tools import TOOLS, peer_inputs
    from dipreg.models import load_model
    from dipreg.stimuli import load_pairs

    model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    inputs = peer_inputs(tokenizer, load_pairs(pairs_file), batch_size, neutral_prompt=neutral_prompt)
    before_build = resident_kib()["VmRSS"]
    runner = TOOLS[tool].build(model, tokenizer, inputs)
    built = resident_kib()["VmRSS"]
    runs = []
    for _ in range(2):
        reset_peak()
        before_run = resident_kib()["VmRSS"]
        with torch.no_grad():
            runner.margins(lens)
        runs.append((resident_kib()["VmHWM"] - before_run) / 1024)
    return {"setup_mb": (built - before_build) / 1024, "first_run_mb": runs[0], "added_mb": runs[1]}


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
