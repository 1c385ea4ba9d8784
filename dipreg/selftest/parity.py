"""Part (a): the target device (float32, bfloat16, and blocks split across devices) against the CPU in float32.

For every supported architecture a tiny seeded random-weight model is measured on the CPU in float32 (the
reference) and again on the target: logit-lens and causal-lens margins, the wrong-margin hinge, and the logit-lens
margins under degradations whose restore is checked bit-exactly (``degrade(..., verify=True)`` and a whole-model
checksum). Tolerances (relative to the largest reference margin):

- :data:`TOLERANCE` ``["float32"]``: same dtype, other kernels (cuBLAS vs CPU; TF32 off): 1e-4;
- ``["bfloat16"]``: bfloat16 weights and residuals through 8 blocks, lens math in float32: 5e-2;
- ``["split"]``: the float32 model with its blocks alternating between the target and the CPU (on a CPU target:
  between the CPU and disk offload), accelerate moving the activations: 1e-4.

Under bfloat16, ``rtn`` is recorded but not judged: rounding bfloat16 weights to a 4-bit grid lands on another grid
point than rounding the float32 weights wherever a weight sits near a midpoint, so its margins differ by design.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dipreg.adapter import ModelAdapter
from dipreg.architectures import SUPPORTED_MODEL_TYPES
from dipreg.eval import degrade, state_checksum
from dipreg.eval.degradation.layouts import UnsupportedOperatorError
from dipreg.losses import BatchView, WrongMarginHinge
from dipreg.prompting import PromptFormat
from dipreg.selftest.build import random_model, tiny_config, word_tokenizer
from dipreg.stimuli import MinimalPair, load_pairs
from dipreg.training.data import collate, pair_examples
from dipreg.trajectory import trajectories_by_lens

TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "split": 1e-4}
#: Degradations checked (parameters sized for width 32); an architecture an operator does not support skips it.
DEGRADATIONS: list[tuple[str, dict[str, Any]]] = [
    ("late_svd", {"rank": 4}),
    ("rtn", {"bits": 4}),
    ("mid_prune", {}),
    ("late_drop", {}),
    ("deprive", {"alpha": 0.5}),
]
HINGE = WrongMarginHinge(window=(0.0, 1.0), delta=1.0, weight=1.0)


def parity_pairs() -> list[MinimalPair]:
    """A few built-in pairs of every family (raw prompts)."""
    pairs = load_pairs("core")
    return [p for i, p in enumerate(pairs) if i % 40 == 0]


@torch.no_grad()
def measure(model: torch.nn.Module, tokenizer: Any, pairs: list[MinimalPair]) -> dict[str, Any]:
    """Logit and causal margins ``(2N, L)`` (float32, CPU), the hinge, and the logit margins under each degradation
    (``None`` when unsupported) with whether the whole-model checksum came back."""
    by_lens = trajectories_by_lens(model, tokenizer, pairs, ["logit", "causal"], prompt="raw", batch_size=4)
    out: dict[str, Any] = {name: torch.cat([t.margin_a, t.margin_b]) for name, t in by_lens.items()}
    adapter = ModelAdapter(model)
    batch = collate(pair_examples(tokenizer, pairs, PromptFormat("raw")), tokenizer.pad_token_id)
    device = adapter.input_device
    residuals = adapter.residuals(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["last"])
    out["hinge"] = float(HINGE(BatchView(residuals, batch["correct"], batch["wrong"], adapter)))
    before = state_checksum(model)
    for name, params in DEGRADATIONS:
        try:
            with degrade(model, name, verify=True, **params):
                traj = trajectories_by_lens(model, tokenizer, pairs, ["logit"], prompt="raw", batch_size=4)["logit"]
            out[name] = torch.cat([traj.margin_a, traj.margin_b])
        except UnsupportedOperatorError:
            out[name] = None
    out["restored"] = state_checksum(model) == before
    return out


#: Per dtype, the measurements recorded but not held to the tolerance (see the module docstring).
NOT_JUDGED = {"bfloat16": {"rtn"}}


def compare(ref: dict[str, Any], got: dict[str, Any], tolerance: float, skip: set[str] = frozenset()) -> dict:
    """Largest differences relative to the largest reference margin, and whether each (but ``skip``) is within
    ``tolerance``."""
    scale = max(float(ref["logit"].abs().max()), 1e-6)

    def rel(a: Tensor | None, b: Tensor | None) -> float | None:
        return None if a is None or b is None else float((a - b).abs().max()) / scale

    diffs = {key: rel(ref[key], got[key]) for key in ("logit", "causal", *(n for n, _ in DEGRADATIONS))}
    diffs["hinge"] = abs(ref["hinge"] - got["hinge"]) / scale
    ok = got["restored"] and all(d is None or d <= tolerance for k, d in diffs.items() if k not in skip)
    return {
        "max_rel_diff": diffs,
        "restored": got["restored"],
        "tolerance": tolerance,
        "not_judged": sorted(skip),
        "ok": ok,
    }


def split_device_map(model: torch.nn.Module, device: torch.device) -> dict[str, int | str]:
    """Blocks alternating between the target and the CPU (a CPU target: CPU and disk); embedding on the target,
    final norm on the other side, head on the target."""
    adapter = ModelAdapter(model)
    here: int | str = (device.index or 0) if device.type == "cuda" else "cpu"
    there = "cpu" if device.type == "cuda" else "disk"
    names = {m: n for n, m in model.named_modules()}
    mapping: dict[str, int | str] = {names[model.get_input_embeddings()]: here}
    mapping.update({names[block]: here if i % 2 == 0 else there for i, block in enumerate(adapter.layers)})
    mapping[names[adapter.final_norm]] = there
    mapping[names[model.get_output_embeddings()]] = here
    for name, module in model.named_modules():  # whatever else holds weights (GPT-2's position embedding)
        placed = any(name == k or name.startswith(k + ".") or k.startswith(name + ".") for k in mapping)
        holds = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if name and not placed and holds:
            mapping[name] = here
    return mapping


def run_parity(device: torch.device, architectures: Sequence[str] | None = None) -> dict[str, Any]:
    """Each architecture (default: every supported one): the target in float32, in bfloat16, and split across
    devices, against the CPU in float32."""
    pairs = parity_pairs()
    tokenizer = word_tokenizer(pairs)
    results: dict[str, Any] = {}
    for arch in architectures or SUPPORTED_MODEL_TYPES:
        config = tiny_config(arch, len(tokenizer))
        ref = measure(random_model(config), tokenizer, pairs)
        row: dict[str, Any] = {}
        for dtype in ("float32", "bfloat16"):
            model = random_model(config, dtype=getattr(torch, dtype), device=str(device))
            row[dtype] = compare(ref, measure(model, tokenizer, pairs), TOLERANCE[dtype], NOT_JUDGED.get(dtype, set()))
        row["split"] = _split(config, device, tokenizer, pairs, ref)
        results[arch] = row
    return {"tolerance": TOLERANCE, "architectures": results}


def _split(config: Any, device: torch.device, tokenizer: Any, pairs: list[MinimalPair], ref: dict) -> dict[str, Any]:
    try:
        from accelerate import dispatch_model
    except ImportError:
        return {"skipped": "accelerate is not installed", "ok": True}
    model = random_model(config)
    plain_checksum = state_checksum(model)  # before dispatch: a checksum, not a second copy of the model
    with tempfile.TemporaryDirectory(prefix="dipreg-selftest-") as folder:
        main = "cpu"  # "cpu" entries then run on the CPU (not offloaded to the target)
        dispatched = dispatch_model(model, split_device_map(model, device), main_device=main, offload_dir=folder)
        result = compare(ref, measure(dispatched, tokenizer, pairs), TOLERANCE["split"])
        result["checksum_as_plain"] = state_checksum(dispatched) == plain_checksum
        result["ok"] = result["ok"] and result["checksum_as_plain"]
    return result
