"""Evaluate one model of `dipreg arms` (a trained arm or the untrained base) on the evaluation set.

Per model: the logit- and causal-lens trajectories from one capture (accuracy, dip, commit; the causal lens is
the paper's §6.4 re-measurement), the accuracy and flips under every degradation condition (applied with
:func:`dipreg.eval.degrade`, restore verified by checksum), and the mean token NLL on a held-out general corpus
(the capability-tax proxy). A trained arm is evaluated with its LoRA adapter merged into a fresh base model, so
each degradation compresses the fine-tuned weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dipreg.adapter import eval_mode
from dipreg.agreement import item_agreement, summarise_agreement
from dipreg.batching import pad_right, pad_token_id
from dipreg.eval import stats
from dipreg.eval.degradation.ledger import state_checksum
from dipreg.eval.degradation.operators import degrade, op_label, parse_ops
from dipreg.models import load_model
from dipreg.stimuli import MinimalPair
from dipreg.trajectory import trajectories, trajectories_by_lens

__all__ = ["corpus_nll", "evaluate_model", "general_texts", "load_arm_model", "parse_conditions"]

CLEAN = "clean"


def parse_conditions(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"clean,rtn:bits=3,..."`` → ``[(label, op, params)]``; ``clean`` (no degradation) always comes first."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    ops = ",".join(p for p in parts if p != CLEAN)
    out: list[tuple[str, str, dict[str, Any]]] = [(CLEAN, CLEAN, {})]
    out += [(op_label(name, params), name, params) for name, params in (parse_ops(ops) if ops else [])]
    return out


def general_texts(limit: int | None = None) -> list[str]:
    """The held-out general-prose corpus shipped with dipreg (first ``limit`` texts)."""
    data = json.loads(resources.files("dipreg.stimuli").joinpath("data/general_text.json").read_text())
    texts = list(data["texts"])
    return texts if limit is None else texts[:limit]


@torch.no_grad()
def corpus_nll(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats/token) of ``model`` over ``texts`` (right-padded batches).

    The model's train/eval mode is restored afterwards.
    """
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts[start : start + batch_size]]
            input_ids, mask, _ = pad_right(ids, pad, device)
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((targets != -100).sum())
    return total / max(count, 1)


def load_arm_model(model_name: str | None, adapter_dir: str | Path | None) -> tuple[nn.Module, Any]:
    """A fresh base model with the arm's LoRA adapter merged in (``adapter_dir=None``: the untrained base)."""
    model, tokenizer = load_model(model_name)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.eval(), tokenizer


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[MinimalPair],
    conditions: str,
    *,
    nll_texts: Sequence[str] = (),
    prompt: str = "raw",
    batch_size: int = 32,
    on_condition: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Clean logit + causal trajectories, accuracy under every condition, and corpus NLL of one model.

    Returns a JSON-ready dict with ``summary`` (per-lens summaries), ``conditions`` (per label: accuracy,
    flips vs clean, per-item correctness), ``agreement`` (logit vs causal lens, :mod:`dipreg.agreement`),
    ``fragility`` (flip rate under late deprivation α=0 when that condition is run, among items correct when
    clean), ``nll`` and per-item dips and agreements.
    """
    checksum = state_checksum(model)  # recorded with the results: the intact weights they were measured on
    lenses = trajectories_by_lens(model, tokenizer, pairs, ["logit", "causal"], batch_size=batch_size, prompt=prompt)
    logit = lenses["logit"]
    rho, sign = item_agreement(logit.did, lenses["causal"].did, logit.window)
    clean = logit.correct.numpy()
    results: dict[str, Any] = {}
    fragility = None
    for label, name, params in parse_conditions(conditions):
        if on_condition is not None:
            on_condition(label)
        if name == CLEAN:
            correct = clean
        else:
            with degrade(model, name, verify=True, tokenizer=tokenizer, **params):
                correct = trajectories(model, tokenizer, pairs, batch_size=batch_size, prompt=prompt).correct.numpy()
        flip = stats.flips(clean, correct)
        results[label] = {
            "accuracy": float(correct.mean()),
            "n_flips": int(flip.sum()),
            "flip_rate": float(flip.sum() / max(int(clean.sum()), 1)),
            "correct": correct.tolist(),
        }
        if name == "deprive" and float(params.get("alpha", 1.0)) == 0.0:
            fragility = results[label]["flip_rate"]
    return {
        "n": len(pairs),
        "ids": [p.id for p in pairs],
        "checksum": checksum,
        "summary": {name: traj.summary()["all"] for name, traj in lenses.items()},
        "agreement": summarise_agreement(rho, sign).as_dict(),
        "items": {
            "logit_dip": logit.max_wrong_dip.tolist(),
            "causal_dip": lenses["causal"].max_wrong_dip.tolist(),
            "final_did": logit.did[:, -1].tolist(),
            "agreement_spearman": rho,
            "agreement_sign": sign,
        },
        "conditions": results,
        "fragility": fragility,
        "nll": corpus_nll(model, tokenizer, list(nll_texts), batch_size=8) if nll_texts else None,
    }
