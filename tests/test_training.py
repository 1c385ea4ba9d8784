"""DipRegModule, the wrong-margin hinge, the pair DataModule, checkpoints, adapter export and `dipreg fit`."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from peft import PeftModel

import dipreg
from dipreg.callbacks import TrainingDivergedError, TrainingHealth
from dipreg.callbacks.heldout import HeldOutEval
from dipreg.cli import main
from dipreg.losses import AuxLoss, BatchView, WrongMarginHinge
from dipreg.recipes import RECIPES, recipe_path
from dipreg.stimuli import save_pairs
from dipreg.training.data import PairDataModule
from dipreg.training.fit import run_fit, translate_args
from dipreg.training.module import DipRegModule
from tests.conftest import make_tiny_model

# -- the hinge on hand-made tensors ------------------------------------------------------------------------


class MarginIsFirstCoordinate:
    """A stand-in adapter whose logit-lens margin is the residual's first coordinate."""

    def margin(self, residual, pos_ids, neg_ids):
        return residual[..., 0]


def _view(margins: torch.Tensor) -> BatchView:
    residuals = margins.unsqueeze(-1).clone().requires_grad_(True)  # (L, B, 1)
    ids = torch.zeros(margins.shape[1], dtype=torch.long)
    return BatchView(residuals, ids, ids, MarginIsFirstCoordinate())  # type: ignore[arg-type]


def test_hinge_is_zero_when_every_window_margin_reaches_delta():
    # 10 layers: the window (0.30, 0.85) holds layers 3..8 (1-based); outside it margins are very negative.
    margins = torch.full((10, 2), -5.0)
    margins[2:8] = 0.5
    assert float(WrongMarginHinge(delta=0.5, weight=1.0)(_view(margins))) == 0.0
    assert float(WrongMarginHinge(delta=0.6, weight=1.0)(_view(margins))) > 0.0


def test_hinge_value_and_gradient_come_only_from_wrong_side_window_layers():
    margins = torch.ones(10, 2)
    margins[0] = -3.0  # outside the window: ignored
    margins[3, 0] = -2.0  # inside, wrong side
    margins[6, 1] = -0.5  # inside, wrong side
    view = _view(margins)
    loss = WrongMarginHinge(delta=0.0, weight=1.0)(view)
    assert float(loss) == pytest.approx((2.0 + 0.5) / (6 * 2))
    loss.backward()
    grad = view.residuals.grad[..., 0]
    nonzero = {tuple(i) for i in grad.nonzero().tolist()}
    assert nonzero == {(3, 0), (6, 1)}


def test_hinge_reads_the_real_logit_lens_margin(llama_tiny):
    adapter = dipreg.ModelAdapter(llama_tiny)
    residuals = torch.randn(adapter.num_layers, 3, llama_tiny.config.hidden_size)
    correct, wrong = torch.tensor([2, 3, 4]), torch.tensor([5, 6, 7])
    expected = torch.relu(-adapter.margin(residuals[2:6], correct, wrong)).mean()  # 8 layers: ℓ = 3..6 in window
    got = WrongMarginHinge()(BatchView(residuals, correct, wrong, adapter))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": -0.1}, "weight"),
        ({"window": (0.3, 1.2)}, "window"),
        ({"window": (-0.1, 0.5)}, "window"),
        ({"window": (0.9, 0.3)}, "window"),
    ],
)
def test_hinge_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WrongMarginHinge(**kwargs)


# -- the module on a tiny model ----------------------------------------------------------------------------


@pytest.fixture
def pairs_file(tiny_pairs, tmp_path) -> str:
    return str(save_pairs(tiny_pairs, tmp_path / "pairs.jsonl"))


def _tiny_module(tiny_tokenizer, model=None, **kwargs) -> DipRegModule:
    kwargs.setdefault("aux_losses", [WrongMarginHinge(weight=0.2)])
    model = model if model is not None else make_tiny_model("llama")
    return DipRegModule(model=model, tokenizer=tiny_tokenizer, r=4, alpha=8, **kwargs)


def _batch(module, pairs_file, batch_size=8):
    dm = PairDataModule(train=pairs_file, val=[pairs_file], batch_size=batch_size, tokenizer=module.tokenizer)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_gradients_reach_lora_parameters_only(tiny_tokenizer, pairs_file):
    module = _tiny_module(tiny_tokenizer)
    total, parts, _ = module.losses(_batch(module, pairs_file))
    assert set(parts) == {"ce", "hinge"}
    total.backward()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in module.named_parameters() if "lora_" not in n)
    assert any(float(module.get_parameter(n).grad.abs().sum()) > 0 for n in with_grad if "lora_B" in n)


def test_answer_ce_equals_the_models_own_logits(tiny_model, tiny_tokenizer, pairs_file):
    module = _tiny_module(tiny_tokenizer, tiny_model, dropout=0.0, aux_losses=[]).eval()
    batch = _batch(module, pairs_file)
    total, parts, _ = module.losses(batch)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    at_answer = logits[torch.arange(len(batch["last"])), batch["last"]]
    torch.testing.assert_close(parts["ce"], torch.nn.functional.cross_entropy(at_answer, batch["correct"]))
    torch.testing.assert_close(total, parts["ce"])


def _adapted_layers(module: DipRegModule) -> set[int]:
    return {
        i for i, layer in enumerate(module.adapter.layers) if any("lora_A" in n for n, _ in layer.named_parameters())
    }


def test_late_only_arm_adapts_only_the_last_quarter(tiny_model, tiny_tokenizer):
    late = _tiny_module(tiny_tokenizer, copy.deepcopy(tiny_model), layers=0.25)
    assert _adapted_layers(late) == {6, 7}
    assert all("lora_" not in n for n, _ in late.model.named_parameters() if ".0." in n)
    assert _adapted_layers(_tiny_module(tiny_tokenizer, tiny_model)) == set(range(8))


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_tokenizer, pairs_file):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = _tiny_module(tiny_tokenizer, dropout=0.0, gradient_checkpointing=checkpointing)
        with torch.no_grad():  # non-zero B so that every LoRA matrix gets a gradient
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        module.losses(_batch(module, pairs_file))[0].backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    assert all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


@pytest.mark.parametrize("layers", [0.0, 1.5, "late"])
def test_bad_layer_selection_is_rejected(tiny_tokenizer, layers):
    with pytest.raises(ValueError, match="layers"):
        _tiny_module(tiny_tokenizer, layers=layers)


def test_a_user_defined_aux_loss_plugs_in_without_changing_the_module(tiny_tokenizer, pairs_file):
    class FinalMargin(AuxLoss):
        name = "final_margin"

        def __call__(self, view):
            return torch.relu(1.0 - view.adapter.margin(view.residuals[-1], view.correct_ids, view.wrong_ids)).mean()

    module = _tiny_module(tiny_tokenizer, aux_losses=[WrongMarginHinge(weight=0.2), FinalMargin(weight=0.5)])
    total, parts, _ = module.losses(_batch(module, pairs_file))
    torch.testing.assert_close(total, parts["ce"] + 0.2 * parts["hinge"] + 0.5 * parts["final_margin"])


class RecordLosses(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _trainer(root: Path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def test_few_step_fit_on_a_tiny_model_logs_and_exports(tiny_tokenizer, tiny_pairs, pairs_file, tmp_path):
    module = _tiny_module(tiny_tokenizer)
    heldout = HeldOutEval(sets=[pairs_file], batch_size=4)
    trainer = _trainer(tmp_path, 4, [heldout], log_every_n_steps=1)
    trainer.fit(module, PairDataModule(train=pairs_file, val=[pairs_file], batch_size=4))
    logged = trainer.logged_metrics
    for key in ("train/loss", "train/ce", "train/hinge", f"val/acc/{pairs_file}"):
        assert key in logged and torch.isfinite(logged[key]), key
    assert (module.adapter_dir() / "adapter_config.json").is_file()
    # "before" is the intact base model, measured with the adapter switched off.
    base = dipreg.trajectories(make_tiny_model("llama"), tiny_tokenizer, tiny_pairs, prompt="auto")
    written = json.loads((Path(trainer.log_dir) / "heldout.json").read_text())
    before = written["before"][pairs_file]["mean_max_wrong_dip"]
    assert before == pytest.approx(base.summary()["all"]["mean_max_wrong_dip"], abs=1e-5)
    # "after" is the trained model: the saved adapter, reloaded with plain PEFT and merged into a fresh base,
    # read through its own output logits (accuracy) and a plain-model lens (dip).
    merged = PeftModel.from_pretrained(make_tiny_model("llama"), str(module.adapter_dir())).merge_and_unload().eval()
    after = written["after"][pairs_file]
    did_out = []
    for pair in tiny_pairs:
        pos, neg = (tiny_tokenizer.encode(t, add_special_tokens=False)[0] for t in (pair.t_pos, pair.t_neg))
        margins = []
        for ctx in (pair.ctx_a, pair.ctx_b):
            with torch.no_grad():
                logits = merged(input_ids=torch.tensor([tiny_tokenizer(ctx)["input_ids"]])).logits[0, -1]
            margins.append(float(logits[pos] - logits[neg]))
        did_out.append(margins[0] - margins[1])
    assert after["accuracy"] == pytest.approx(sum(d > 0 for d in did_out) / len(did_out))
    trained = dipreg.trajectories(merged, tiny_tokenizer, tiny_pairs, prompt="auto").summary()["all"]
    assert after["mean_max_wrong_dip"] == pytest.approx(trained["mean_max_wrong_dip"], abs=1e-5)
    assert after["mean_commit_layer_frac"] == pytest.approx(trained["mean_commit_layer_frac"], abs=1e-6)
    assert abs(after["mean_max_wrong_dip"] - before) > 1e-4, "training must move the dip for this check to bite"


def test_saved_adapter_reloads_with_plain_peft_and_gives_the_same_logits(tiny_tokenizer, pairs_file, tmp_path):
    module = _tiny_module(tiny_tokenizer)
    trainer = _trainer(tmp_path, 3, limit_val_batches=0)
    trainer.fit(module, PairDataModule(train=pairs_file, val=[pairs_file], batch_size=4))
    reloaded = PeftModel.from_pretrained(make_tiny_model("llama"), str(module.adapter_dir())).eval()
    batch = _batch(module, pairs_file)
    module.model.eval()
    with torch.no_grad():
        want = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = make_tiny_model("llama")(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(base, want)  # the adapter did change the model


def test_checkpoint_holds_adapter_only_and_resume_gives_the_same_next_step_loss(tiny_tokenizer, pairs_file, tmp_path):
    def data():  # 8 examples, 2 batches per epoch, fixed order
        return PairDataModule(train=pairs_file, val=[pairs_file], batch_size=4, shuffle=False)

    ckpt_dir = tmp_path / "ckpt"
    first = RecordLosses()
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1)
    _trainer(tmp_path / "a", 3, [first, saver], limit_val_batches=0).fit(
        _tiny_module(tiny_tokenizer, dropout=0.0), data()
    )
    ckpt = ckpt_dir / "epoch=0-step=2.ckpt"
    keys = torch.load(ckpt, weights_only=False)["state_dict"].keys()
    assert keys and all("lora_" in k for k in keys)

    resumed = RecordLosses()
    fresh = DipRegModule(
        model=make_tiny_model("llama"),
        tokenizer=tiny_tokenizer,
        r=4,
        alpha=8,
        dropout=0.0,
        aux_losses=[WrongMarginHinge(weight=0.2)],
    )
    _trainer(tmp_path / "b", 3, [resumed], limit_val_batches=0).fit(fresh, data(), ckpt_path=str(ckpt))
    assert len(first.losses) == 3 and len(resumed.losses) == 1
    assert resumed.losses[0] == pytest.approx(first.losses[2], rel=1e-5)


# -- recipes and the CLI -----------------------------------------------------------------------------------


def test_recipe_and_model_flags_are_translated_with_configs_first():
    args = translate_args(["--trainer.max_steps", "5", "--recipe", "dip_reg", "--model", "some/model"])
    assert args == [
        "--config",
        str(recipe_path("dip_reg")),
        "--trainer.max_steps",
        "5",
        "--model.model_name",
        "some/model",
    ]


def test_all_eight_recipes_are_packaged():
    assert set(RECIPES) == {
        "output_only",
        "late_only",
        "dip_reg",
        "dip_reg_l005",
        "dip_reg_l05",
        "dip_reg_monitored",
        "dip_reg_causal",
        "dip_reg_tuned",
    }


def test_unknown_recipe_and_missing_config_give_clear_errors(capsys):
    assert main(["fit", "--recipe", "nope"]) == 2
    assert "Unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["fit", "--config", "/no/such/recipe.yaml"]) == 2
    assert "/no/such/recipe.yaml" in capsys.readouterr().err


def test_a_recipe_naming_an_unknown_model_gives_a_clear_error(capsys, tmp_path):
    recipe = tmp_path / "bad_model.yaml"
    recipe.write_text(recipe_path("dip_reg").read_text().replace("model_name: null", "model_name: /no/such/model"))
    assert main(["fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "/no/such/model" in capsys.readouterr().err


def test_a_recipe_with_negative_lambda_gives_a_clear_error(capsys, tmp_path):
    recipe = tmp_path / "bad_lambda.yaml"
    recipe.write_text(recipe_path("dip_reg").read_text().replace("weight: 0.2", "weight: -0.2"))
    assert main(["fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "weight (λ) must be a finite number >= 0, got -0.2" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize("name", ["output_only", "late_only", "dip_reg", "dip_reg_l005", "dip_reg_l05"])
def test_every_recipe_parses_and_instantiates(name, tmp_path):
    cli = run_fit(["--recipe", name, "--trainer.default_root_dir", str(tmp_path)], run=False)
    module = cli.model
    hinge = [loss for loss in module.aux_losses if isinstance(loss, WrongMarginHinge)]
    expected = {"output_only": None, "late_only": None, "dip_reg": 0.2, "dip_reg_l005": 0.05, "dip_reg_l05": 0.5}[name]
    assert [h.weight for h in hinge] == ([] if expected is None else [expected])
    layers = _adapted_layers(module)
    assert layers == (set(range(22, 30)) if name == "late_only" else set(range(30)))
    assert cli.datamodule.train_name == "comp_train" and cli.trainer.max_steps > 0


@pytest.mark.integration
def test_short_fit_of_the_default_model_through_the_cli(tmp_path):
    rc = main(
        [
            "fit",
            "--recipe",
            "dip_reg",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--data.batch_size",
            "4",
            "--heldout.sets",
            "[comp_strict]",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    results = json.loads((log_dir / "heldout.json").read_text())
    assert results["step"] == 2 and results["before"]["comp_strict"]["n"] == 25
    assert (log_dir / "adapter" / "adapter_model.safetensors").is_file()
    (ckpt,) = (log_dir / "checkpoints").iterdir()
    assert ckpt.stat().st_size < 100e6  # adapter + optimizer state, not the 540 MB base model


def test_import_dipreg_does_not_import_lightning(fresh_interpreter):
    """``import dipreg`` alone imports no Lightning, and ``dipreg.DipRegModule`` then resolves lazily."""
    assert fresh_interpreter["import_dipreg"] is None, fresh_interpreter["import_dipreg"]
    assert fresh_interpreter["lazy_module"] is None, fresh_interpreter["lazy_module"]


# -- checkpoints that do not fit the module, and argument checks -----------------------------------------------


def test_resuming_from_a_checkpoint_of_other_layers_is_an_error_naming_what_differs(
    tiny_tokenizer, pairs_file, tmp_path
):
    from dipreg.training.module import CheckpointMismatchError

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1)
    data = PairDataModule(train=pairs_file, val=[pairs_file], batch_size=4)
    _trainer(tmp_path / "a", 1, [saver], limit_val_batches=0).fit(_tiny_module(tiny_tokenizer, aux_losses=[]), data)
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    late = _tiny_module(tiny_tokenizer, aux_losses=[], layers=0.25)
    message = r"84 weight\(s\) in it have no place in this module .* \(this module: r=4, layers=0\.25"
    with pytest.raises(CheckpointMismatchError, match=message):
        _trainer(tmp_path / "b", 2, limit_val_batches=0).fit(late, data, ckpt_path=str(ckpt))


def test_an_adapter_only_checkpoint_loads_without_the_frozen_base(tiny_tokenizer):
    written = _tiny_module(tiny_tokenizer, aux_losses=[])
    with torch.no_grad():
        for name, p in written.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    checkpoint = written.state_dict()
    assert checkpoint and all("lora_" in k for k in checkpoint)
    fresh = _tiny_module(tiny_tokenizer, aux_losses=[])
    keys = fresh.load_state_dict(checkpoint, strict=True)  # strict or not: the base is never required
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in checkpoint.items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": True}, r"r \(the LoRA rank\) must be an integer >= 1, got True \(bool\)"),
        ({"r": 2.0}, r"r \(the LoRA rank\) must be an integer >= 1, got 2\.0 \(float\)"),
        ({"r": 0}, r"r \(the LoRA rank\) must be an integer >= 1, got 0"),
        ({"alpha": "abc"}, r"alpha \(the LoRA scaling\) must be a finite number in \(0, inf\), got 'abc' \(str\)"),
        ({"alpha": 0}, r"alpha \(the LoRA scaling\) must be a finite number in \(0, inf\), got 0"),
        ({"dropout": -0.1}, r"dropout must be a finite number in \[0, 1\)"),
        ({"lr": float("inf")}, r"lr must be a finite number in \(0, inf\), got inf"),
        ({"weight_decay": None}, r"weight_decay must be a finite number in \[0, inf\), got None"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be True or False"),
        ({"layers": True}, "layers must be 'all' or a fraction"),
        ({"target_modules": "q_proj"}, "target_modules must be None"),
    ],
)
def test_module_arguments_are_checked_strictly_and_named(tiny_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DipRegModule(model=make_tiny_model("llama"), tokenizer=tiny_tokenizer, **{"r": 4, **kwargs})


# -- TrainingHealth: a fit whose loss is non-finite or pinned at ln V stops with the step named ------------------

LN_64 = math.log(64)


def _drive(health: TrainingHealth, losses: list[float], accumulate: int = 1) -> SimpleNamespace:
    """Feed ``losses`` (one per micro-batch) to ``health`` as Lightning does: the loss divided by the accumulation,
    ``global_step`` advanced after every ``accumulate``-th micro-batch. Returns the fake trainer."""
    module = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vocab_size=64)), hparams={"lr": 0.5})
    trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=accumulate, current_epoch=0)
    health.on_fit_start(trainer, module)
    health.on_train_start(trainer, module)
    for index, loss in enumerate(losses):
        if (index + 1) % accumulate == 0:
            trainer.global_step += 1
        health.on_train_batch_end(trainer, module, {"loss": torch.tensor(loss / accumulate)}, None, index)
    return trainer


def test_health_stops_after_n_consecutive_steps_at_ln_v_and_names_them():
    _drive(TrainingHealth(diverged_steps=3), [5.0, 5.0, 1.0, 5.0, 5.0])  # two stuck steps, then a reset: runs on
    with pytest.raises(TrainingDivergedError) as info:
        _drive(TrainingHealth(diverged_steps=3), [5.0, 5.0, 1.0, 5.0, LN_64, 5.0, 1.0])
    assert str(info.value).startswith("Training stopped at optimizer step 6: the training loss has been >= ln V = ")
    message = str(info.value)
    assert "ln(64) = 4.1589" in message and "for 3 consecutive steps (4..6; last loss 5.0000) with lr=0.5" in message


def test_health_counts_optimizer_steps_under_gradient_accumulation():
    # micro-batch losses 5,1 average 3 < ln 64: not stuck; 5,5 twice: two stuck steps only
    _drive(TrainingHealth(diverged_steps=3), [5.0, 1.0, 5.0, 5.0, 5.0, 5.0], accumulate=2)
    with pytest.raises(TrainingDivergedError, match=r"optimizer step 3: .* for 3 consecutive steps \(1\.\.3;"):
        _drive(TrainingHealth(diverged_steps=3), [5.0] * 6, accumulate=2)
    with pytest.raises(TrainingDivergedError, match=r"optimizer step 2 \(epoch 0, batch 3\): the training loss is inf"):
        _drive(TrainingHealth(), [1.0, 1.0, 1.0, math.inf], accumulate=2)


def test_health_tolerance_and_the_disabled_rule():
    with pytest.raises(TrainingDivergedError):
        _drive(TrainingHealth(diverged_steps=2), [LN_64 - 5e-4] * 2)  # float rounding of a uniform softmax
    _drive(TrainingHealth(diverged_steps=2), [LN_64 - 0.01] * 2)
    _drive(TrainingHealth(diverged_steps=None), [9.0] * 50)  # the ln V rule off
    with pytest.raises(TrainingDivergedError, match=r"optimizer step 3 .*the training loss is nan"):
        _drive(TrainingHealth(diverged_steps=None), [9.0, 9.0, math.nan])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"diverged_steps": 0}, "diverged_steps (--health.diverged_steps) must be an integer >= 1 or None"),
        ({"diverged_steps": True}, "got True"),
        ({"tolerance": -1.0}, "tolerance (--health.tolerance) must be a finite number >= 0"),
        ({"vocab_size": 1}, "vocab_size (--health.vocab_size) must be an integer >= 2 or None"),
    ],
)
def test_health_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainingHealth(**kwargs)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> str:
    path = tmp_path / "tiny-llama"
    make_tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def _tiny_fit_args(model_dir: str, pairs_file: str, root: Path, *flags: str) -> list[str]:
    return [
        "fit",
        "--recipe",
        "output_only",
        "--model",
        model_dir,
        "--data.train",
        pairs_file,
        "--data.val",
        f"[{pairs_file}]",
        "--data.batch_size",
        "4",
        "--heldout.sets",
        f"[{pairs_file}]",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *flags,
    ]


def test_dipreg_fit_with_a_pinned_loss_exits_2_naming_the_step_and_a_healthy_model_runs(
    tiny_model_dir, tiny_tokenizer, pairs_file, tmp_path, capsys
):
    # The planted fault: a zero final-norm weight makes every logit 0, so the loss is exactly ln V at every step
    # (no gradient reaches the adapter, whatever the learning rate).
    pinned = tmp_path / "zero-norm"
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(pinned)
    tiny_tokenizer.save_pretrained(pinned)
    args = _tiny_fit_args(str(pinned), pairs_file, tmp_path / "a", "--trainer.max_steps", "12")
    assert main([*args, "--model.lr", "1e9"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: Training stopped at optimizer step 10: the training loss has been >= ln V = ln(64) = 4.1589" in err
    assert "for 10 consecutive steps" in err and "with lr=1e+09" in err and "Traceback" not in err
    assert main(_tiny_fit_args(tiny_model_dir, pairs_file, tmp_path / "b", "--trainer.max_steps", "12")) == 0


def test_fit_attaches_health_and_accepts_max_steps_minus_one_with_explicit_max_epochs(tiny_model_dir, tmp_path):
    cli = run_fit(
        [
            "--recipe",
            "output_only",
            "--model",
            tiny_model_dir,
            "--trainer.max_steps",
            "-1",
            "--trainer.max_epochs",
            "2",
            "--health.diverged_steps",
            "null",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert cli.trainer.max_steps == -1 and cli.trainer.max_epochs == 2
    (health,) = [c for c in cli.trainer.callbacks if isinstance(c, TrainingHealth)]
    assert health.diverged_steps is None
    assert cli.trainer.progress_bar_callback is None


@pytest.mark.integration
def test_default_model_with_lr_1e9_stops_at_ln_v(tmp_path, capsys):
    rc = main(
        [
            "fit",
            "--recipe",
            "output_only",
            "--model.lr",
            "1e9",
            "--trainer.max_steps",
            "8",
            "--health.diverged_steps",
            "3",
            "--data.batch_size",
            "4",
            "--heldout.sets",
            "[comp_strict]",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert "Training stopped at optimizer step" in err and "ln(49152) = 10.8027" in err


@pytest.mark.parametrize("name", RECIPES)
def test_every_packaged_recipe_instantiates_on_a_tiny_saved_model(name, tiny_model_dir, tmp_path):
    from dipreg.callbacks import CompressionRetention, DipMonitor
    from dipreg.callbacks.probe import resolve_prompt
    from dipreg.recipes import load_recipe

    recipe = load_recipe(name)
    cli = run_fit(["--recipe", name, "--model", tiny_model_dir, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert str(cli.model.model.name_or_path) == tiny_model_dir
    assert cli.datamodule.prompt.style == recipe["data"]["prompt"] == "raw"
    assert cli.trainer.max_steps == recipe["trainer"]["max_steps"] > 0
    hinge = [loss.weight for loss in cli.model.aux_losses if isinstance(loss, WrongMarginHinge)]
    assert hinge == [a["init_args"]["weight"] for a in recipe["model"]["aux_losses"]]
    wanted = [c["class_path"].rsplit(".", 1)[1] for c in recipe["trainer"].get("callbacks", [])]
    ours = {"DipMonitor", "CompressionRetention"}
    assert [type(c).__name__ for c in cli.trainer.callbacks if type(c).__name__ in ours] == wanted
    if name != "dip_reg_monitored":
        return
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, DipMonitor)]
    (retention,) = [c for c in cli.trainer.callbacks if isinstance(c, CompressionRetention)]
    assert (monitor.pairs_spec, monitor.every_n_steps, monitor.lenses) == ("comp_loose", 15, ("logit", "causal"))
    assert (retention.pairs_spec, retention.on) == ("comp_strict", "checkpoint")
    assert retention.specs == [("mid_svd", {"rank": 64}), ("late_svd", {"rank": 64}), ("rtn", {"bits": 3})]
    # prompt: null in the recipe, so both probe the data's (raw) prompts, as the fit trains on them
    trainer = SimpleNamespace(datamodule=cli.datamodule)
    for callback in (monitor, retention):
        assert callback.prompt is None
        assert resolve_prompt(callback.prompt, trainer, "test").style == "raw"
    assert any(isinstance(c, HeldOutEval) for c in cli.trainer.callbacks)  # dipreg's own callbacks are kept


def test_fit_help_starts_with_dipregs_options_and_every_packaged_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_fit(["--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: dipreg fit [--recipe NAME")
    header, sep, lightning_help = out.partition("LightningCLI's options:")
    # LightningCLI's own option list comes after the header, not inside it
    assert sep and "--trainer.gradient_clip_val" in lightning_help and "--trainer.gradient_clip_val" not in header
    for option in ("--recipe NAME", "--config FILE", "--model NAME"):
        assert option in header
    for name in RECIPES:
        assert re.search(rf"^ +{name}$", header, re.MULTILINE), name
    assert "--trainer.callbacks+=dipreg.callbacks.DipMonitor" in header
    assert "dipreg fit --recipe dip_reg_monitored" in header
