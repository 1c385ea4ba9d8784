"""Lens math in float32 from bfloat16/float16 residuals, the model's own output margin in that dtype, and LoRA
training of a bfloat16 base under Lightning's bf16-mixed and bf16-true precision (CPU only).

Tolerances (stated once, used below):
- ``LENS_ADDS_NOTHING``: the lens reads the low-precision values it is given (normed residual, two rows) and must add
  no error of its own: it equals a float64 product of exactly those values up to float32 accumulation (1e-5 of the
  summed magnitudes ``Σ|n_d·u_d|``). A bfloat16 product would be off by ~1e-2 of it.
- ``rounding_bound``: against the float32 model, the rounding of the residual and of the weights to the dtype moves
  a margin by at most ``ROUNDING_FACTOR · eps(dtype) · Σ_d |n_d|(|u_pos,d| + |u_neg,d|)`` (a dot product's
  rounding bound with its inputs perturbed by eps relative; factor 8 covers the norm's own rounding).
- the model's own output logits are rounded to the dtype: ``|lens − model| ≤ eps(dtype) · (|l_pos| + |l_neg|)`` plus
  ``LENS_ADDS_NOTHING`` (half an ulp per logit, twice over for the softcap's rounding).
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import ARCHITECTURES, make_tiny_model

import dipreg
from dipreg.adapter import ModelAdapter
from dipreg.batching import context_batches
from dipreg.losses import BatchView, WrongMarginHinge
from dipreg.prompting import PromptFormat
from dipreg.stimuli import candidate_token_ids, load_pairs, save_pairs
from dipreg.training.data import PairDataModule
from dipreg.training.module import DipRegModule

LOW = (torch.bfloat16, torch.float16)
LENS_ADDS_NOTHING = 1e-5
ROUNDING_FACTOR = 8.0


def _captured(model, tokenizer, pairs, prompt: str = "raw"):
    """Residuals ``(L, 2N, D)`` of every context (interleaved a/b) and the candidate ids of each context."""
    adapter = ModelAdapter(model)
    pos, neg = candidate_token_ids(pairs, tokenizer)
    pos_ids = torch.tensor(pos).repeat_interleave(2)
    neg_ids = torch.tensor(neg).repeat_interleave(2)
    residuals = torch.empty(adapter.num_layers, 2 * len(pairs), model.config.hidden_size)
    with torch.no_grad():
        for batch in context_batches(tokenizer, pairs, 8, adapter, PromptFormat(prompt)):
            residuals[:, batch.rows] = adapter.residuals(batch.input_ids, batch.attention_mask, batch.last).float()
    return residuals, pos_ids, neg_ids


def _reference(adapter: ModelAdapter, normed: torch.Tensor, ids: torch.Tensor):
    """float64 logits of ``normed`` (as given) on the head's rows (as stored), plus bias and softcap: the naive
    definition, written out here; and the summed magnitudes ``Σ|n_d·u_d|`` that bound its rounding."""
    rows = adapter.lm_head.weight[ids].double()
    terms = normed.double() * rows
    logits = terms.sum(-1)
    if getattr(adapter.lm_head, "bias", None) is not None:
        logits = logits + adapter.lm_head.bias[ids].double()
    if adapter.softcap is not None:
        logits = torch.tanh(logits / adapter.softcap) * adapter.softcap
    return logits, terms.abs().sum(-1)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lens_on_low_precision_residuals_is_float32_math_and_near_the_float32_margins(
    arch, dtype, tiny_tokenizer, tiny_pairs
):
    fp32 = make_tiny_model(arch)
    residuals, pos_ids, neg_ids = _captured(fp32, tiny_tokenizer, tiny_pairs)
    want = ModelAdapter(fp32).margin(residuals, pos_ids, neg_ids)

    low = ModelAdapter(copy.deepcopy(fp32).to(dtype))
    low_residuals = residuals.to(dtype)
    got = low.margin(low_residuals, pos_ids, neg_ids)
    assert got.dtype == torch.float32

    # 1. no error of its own: float64 of exactly the low-precision values it reads
    with torch.no_grad():
        normed = low.final_norm(low_residuals)
        ref_pos, mag_pos = _reference(low, normed, pos_ids)
        ref_neg, mag_neg = _reference(low, normed, neg_ids)
    exact = (ref_pos - ref_neg).float()
    assert ((got - exact).abs() <= LENS_ADDS_NOTHING * (mag_pos + mag_neg).float() + 1e-7).all()

    # 2. near the float32 lens: within the rounding bound of the dtype
    with torch.no_grad():
        normed32 = ModelAdapter(fp32).final_norm(residuals)
        rows = fp32.get_output_embeddings().weight
        scale = (normed32.abs() * (rows[pos_ids].abs() + rows[neg_ids].abs())).sum(-1)
    bound = ROUNDING_FACTOR * torch.finfo(dtype).eps * scale
    assert ((got - want).abs() <= bound).all(), float(((got - want).abs() / bound).max())

    # 3. the hinge reads the same float32 margins
    view = BatchView(low_residuals, pos_ids, neg_ids, low)
    hinge = WrongMarginHinge(window=(0.0, 1.0), delta=0.5, weight=1.0)
    assert hinge(view).dtype == torch.float32
    torch.testing.assert_close(hinge(view), torch.relu(0.5 - exact).mean(), atol=1e-5, rtol=1e-5)


def _own_output_margins(model, tokenizer, pairs) -> torch.Tensor:
    """The model's own output-logit margin (its forward, its dtype) of every context, one context at a time."""
    pos, neg = candidate_token_ids(pairs, tokenizer)
    adapter = ModelAdapter(model)
    prompt = PromptFormat("raw")
    out = []
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            for ctx in (pair.ctx_a, pair.ctx_b):
                ids = tokenizer(prompt.render(ctx, tokenizer), return_tensors="pt")["input_ids"]
                logits = model(input_ids=ids.to(adapter.input_device)).logits[0, -1]
                out.append((logits[pos[i]], logits[neg[i]]))
    return torch.tensor([[float(p), float(n)] for p, n in out])


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [(arch, torch.bfloat16) for arch in ARCHITECTURES] + [("llama", torch.float16), ("gemma2", torch.float16)],
    ids=str,
)
def test_last_layer_lens_margin_is_the_models_own_output_margin_in_that_dtype(arch, dtype, tiny_tokenizer, tiny_pairs):
    model = make_tiny_model(arch).to(dtype)
    pairs = tiny_pairs[:2]
    traj = dipreg.trajectories(model, tiny_tokenizer, pairs, prompt="raw", batch_size=1)
    assert traj.did.dtype == torch.float32
    own = _own_output_margins(model, tiny_tokenizer, pairs)
    lens = torch.stack([traj.margin_a[:, -1], traj.margin_b[:, -1]], dim=1).reshape(-1)
    bound = torch.finfo(dtype).eps * own.abs().sum(1) + 1e-6
    assert ((lens - (own[:, 0] - own[:, 1])).abs() <= bound).all()


@pytest.mark.integration
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_default_model_lens_in_low_precision(default_model, dtype):
    """The default model: float32 lens math on low-precision residuals (no error of its own; within the rounding
    bound of the float32 margins), and at ℓ = L the bfloat16 model's own output margin (float16 matrix products
    on a CPU are too slow for the suite; the tiny models check float16 there)."""
    model, tok = default_model
    pairs = load_pairs("core")[::140][:2]
    residuals, pos_ids, neg_ids = _captured(model, tok, pairs, prompt="auto")
    want = ModelAdapter(model).margin(residuals, pos_ids, neg_ids)
    low_model = copy.deepcopy(model).to(dtype)
    low = ModelAdapter(low_model)
    got = low.margin(residuals.to(dtype), pos_ids, neg_ids)
    with torch.no_grad():
        normed = low.final_norm(residuals.to(dtype))
        ref_pos, mag_pos = _reference(low, normed, pos_ids)
        ref_neg, mag_neg = _reference(low, normed, neg_ids)
        normed32 = ModelAdapter(model).final_norm(residuals)
        rows = model.get_output_embeddings().weight
        scale = (normed32.abs() * (rows[pos_ids].abs() + rows[neg_ids].abs())).sum(-1)
    assert ((got - (ref_pos - ref_neg).float()).abs() <= LENS_ADDS_NOTHING * (mag_pos + mag_neg).float()).all()
    assert ((got - want).abs() <= ROUNDING_FACTOR * torch.finfo(dtype).eps * scale).all()

    if dtype != torch.bfloat16:
        return
    traj = dipreg.trajectories(low_model, tok, pairs, prompt="raw", batch_size=1, share_prefix=False)
    own = _own_output_margins(low_model, tok, pairs)
    lens = torch.stack([traj.margin_a[:, -1], traj.margin_b[:, -1]], dim=1).reshape(-1)
    assert ((lens - (own[:, 0] - own[:, 1])).abs() <= torch.finfo(dtype).eps * own.abs().sum(1) + 1e-6).all()


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_two_step_fit_of_a_bfloat16_base_keeps_lora_in_float32(precision, tiny_tokenizer, tiny_pairs, tmp_path):
    """A bfloat16 frozen base with float32 LoRA weights trains two steps under Lightning's bf16 precision: the
    loss is finite, the LoRA weights moved and stayed float32, the base weights are bit-identical and bfloat16."""
    base = make_tiny_model("llama").to(torch.bfloat16)
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    module = DipRegModule(
        model=base, tokenizer=tiny_tokenizer, r=4, dropout=0.0, aux_losses=[WrongMarginHinge(weight=0.2)]
    )
    lora_before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert lora_before and all(p.dtype == torch.float32 for p in lora_before.values())
    pairs_file = save_pairs(tiny_pairs, tmp_path / "pairs.jsonl")
    trainer = L.Trainer(
        max_steps=2,
        precision=precision,
        accelerator="cpu",
        default_root_dir=tmp_path,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, PairDataModule(train=str(pairs_file), val=[], batch_size=4, prompt="raw"))
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trained.values())
    assert any(not torch.equal(trained[n], lora_before[n]) for n in trained)
    for name, param in module.model.get_base_model().named_parameters():
        if not param.requires_grad:
            key = name.replace(".base_layer.", ".")
            assert param.dtype == torch.bfloat16, name
            assert torch.equal(param, frozen_before[key]), name


def test_module_loads_the_frozen_base_in_the_dtype_it_is_given(tiny_tokenizer, tmp_path):
    folder = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    module = DipRegModule(model_name=str(folder), dtype="bfloat16", r=4)
    frozen = [p.dtype for p in module.parameters() if not p.requires_grad]
    trainable = [p.dtype for p in module.parameters() if p.requires_grad]
    assert set(frozen) == {torch.bfloat16} and set(trainable) == {torch.float32}
    with pytest.raises(ValueError, match="dtype"):
        DipRegModule(model_name=str(folder), dtype="int8")


def test_bench_reports_the_bf16_vs_fp32_lens_difference(tiny_tokenizer, tiny_pairs):
    """``lens_bf16_vs_fp32_maxdiff`` is the largest margin difference between a bfloat16 and a float32 run of the
    same weights, recomputed here from two independent trajectories; the bench model is left as it was."""
    from dipreg.bench.core import BenchContext
    from dipreg.bench.lens import bf16_vs_fp32

    model = make_tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ratio = bf16_vs_fp32(BenchContext(model, tiny_tokenizer, tiny_pairs, 4, 1, naive_pairs=3))
    pairs = tiny_pairs[:3]
    fp32 = dipreg.trajectories(make_tiny_model("llama"), tiny_tokenizer, pairs, batch_size=4)
    bf16 = dipreg.trajectories(make_tiny_model("llama").to(torch.bfloat16), tiny_tokenizer, pairs, batch_size=4)
    want = max(float((bf16.margin_a - fp32.margin_a).abs().max()), float((bf16.margin_b - fp32.margin_b).abs().max()))
    assert ratio.name == "lens_bf16_vs_fp32_maxdiff" and ratio.value == pytest.approx(want, rel=1e-6)
    assert ratio.value > 0 and "3 pairs" in ratio.detail
    assert all(p.dtype == torch.float32 and p.equal(before[n]) for n, p in model.named_parameters())
