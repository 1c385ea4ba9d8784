"""GPU check, not collected by pytest: ``DipMonitorCallback`` in an HF ``Trainer`` run sharded with FSDP by accelerate.

Every rank trains a tiny random Llama (built from a config: no network, no model files) for 4 steps with the
monitor probing every 2 steps, then the monitor's scalars are compared with a non-sharded reference,
``dipreg.trajectories`` of the same weights: the initial weights (the step-0 probe) and the final weights gathered
from the shards (the last probe). One line per compared scalar; exit status 1 when any differs by more than
``--tolerance``. Run from the repository root, dipreg installed (``pip install --no-deps -e .``)::

    torchrun --nproc_per_node 1 tests/gpu/gpu_hf_fsdp.py --fsdp-version 2
    torchrun --nproc_per_node 1 tests/gpu/gpu_hf_fsdp.py --fsdp-version 1

One GPU runs FSDP with world size 1, which still wraps the model and runs the strategy's gathering context
(FSDP2 ``unshard``, FSDP1 ``summon_full_params``) around every probe; ``--nproc_per_node N`` on N GPUs shards for
real. ``--fsdp-version 0`` runs the same comparison without FSDP (on the CPU when there is no GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from dipreg.callbacks.hf import DipMonitorCallback
from dipreg.callbacks.sharding import sharding_backend
from dipreg.selftest.build import random_model, tiny_config, word_tokenizer
from dipreg.stimuli import load_pairs

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.dip_reference
from tests.dip_reference import reference_scalars

LENSES = ("logit", "causal")  # the lenses tests.dip_reference recomputes


def compare(label: str, logged: dict[str, float], expected: dict[str, float], tolerance: float) -> bool:
    """Print ``logged`` against ``expected`` per scalar; whether every one is within ``tolerance``."""
    good = True
    for key, value in expected.items():
        diff = abs(logged[key] - value)
        good &= diff <= tolerance
        print(f"{label:>12}  {key:<28} monitor {logged[key]: .6f}  reference {value: .6f}  |diff| {diff:.2e}")
    return good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp-version", type=int, choices=(0, 1, 2), default=2, help="0: no FSDP")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    options = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = load_pairs("core")[:8]
    tokenizer = word_tokenizer(pairs)
    config = tiny_config("llama", len(tokenizer))
    texts = [p.ctx_a for p in pairs] + [p.ctx_b for p in pairs]
    rows = tokenizer(texts, padding=True)["input_ids"]
    data = [{"input_ids": ids, "labels": ids} for ids in rows]

    fsdp: dict[str, Any] = {}
    if options.fsdp_version:
        fsdp = {
            "fsdp": True,
            "fsdp_config": {"version": options.fsdp_version, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        }
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="dipreg-gpu-hf-fsdp-"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        **fsdp,
    )
    before = reference_scalars(random_model(config, seed=0, device=device), tokenizer, pairs)
    monitor = DipMonitorCallback(pairs, every_n_steps=2, lenses=LENSES, tokenizer=tokenizer)
    trainer = Trainer(model=random_model(config, seed=0).train(), args=args, train_dataset=data, callbacks=[monitor])
    trainer.train()
    backend = sharding_backend(trainer.model_wrapped)
    full = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: every rank gathers
    if args.process_index != 0:
        return 0
    final = random_model(config, seed=1, device=device)
    final.load_state_dict(full)
    after = reference_scalars(final, tokenizer, pairs)
    steps = [int(h["step"]) for h in monitor.history]
    print(
        f"world size {args.world_size}, FSDP version {options.fsdp_version or 'none'}, backend {backend}, "
        f"wrapper {type(trainer.model_wrapped).__name__}, probed steps {steps}"
    )
    good = steps == [0, 2, 4]
    good &= compare("step 0", monitor.history[0], before, options.tolerance)
    good &= compare(f"step {steps[-1]}", monitor.history[-1], after, options.tolerance)
    moved = abs(monitor.history[-1]["dip/logit/max_wrong_dip"] - monitor.history[0]["dip/logit/max_wrong_dip"])
    print(f"training moved dip/logit/max_wrong_dip by {moved:.4f}")
    print("OK" if good else "MISMATCH")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
