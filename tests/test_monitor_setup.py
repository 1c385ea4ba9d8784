"""Where DipMonitor and CompressionRetention find the tokenizer (and the model) of a user's own LightningModule, and
when the monitor probes."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import dipreg
from dipreg.callbacks import CompressionRetention, DipMonitor, DipProbe, MonitorSetupError
from dipreg.callbacks.probe import resolve_tokenizer


class UserModule(pl.LightningModule):
    """A user's module: an HF model under ``self.net``, a tokenizer (if any) under whatever names ``extra`` gives."""

    def __init__(self, net: torch.nn.Module, **extra: object) -> None:
        super().__init__()
        self.net = net
        self.lr = 1e-2
        for name, value in extra.items():
            setattr(self, name, value)

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MustNotTrain(UserModule):
    def training_step(self, batch, batch_idx):  # pragma: no cover - setup must fail first
        raise AssertionError("training must not start")


def fit(
    tmp_path: Path, module: pl.LightningModule, callbacks: list, max_steps: int = 2, validate_every: int | None = None
) -> None:
    """Fit on 8 sequences (12 with validation, then one batch of them validated every ``validate_every`` steps)."""
    count = 8 if validate_every is None else 12
    data = DataLoader(list(torch.randint(2, 40, (count, 12), generator=torch.Generator().manual_seed(0))), batch_size=2)
    validation = {} if validate_every is None else {"val_check_interval": validate_every, "limit_val_batches": 1}
    pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        **validation,
    ).fit(module, data, None if validate_every is None else data)


def test_a_tokenizer_kept_as_self_tok_is_found_by_both_callbacks(tmp_path, tiny_tokenizer, tiny_pairs):
    module = UserModule(make_tiny_model("llama"), tok=tiny_tokenizer)
    monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",), log_figures=False)
    retention = CompressionRetention(tiny_pairs, "rtn:bits=4", prompt="raw")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(tmp_path, module, [monitor, retention, ckpt])
    assert [int(h["step"]) for h in monitor.history] == [0, 2]
    assert [int(h["step"]) for h in retention.history] == [2]
    assert resolve_tokenizer(None, module, "DipMonitor", module.net) is tiny_tokenizer


def test_the_tokenizer_attribute_comes_first_and_the_argument_before_it(tiny_tokenizer):
    other = copy.deepcopy(tiny_tokenizer)
    module = UserModule(make_tiny_model("llama"), a_tok=other, tokenizer=tiny_tokenizer)  # "a_tok" sorts first
    assert resolve_tokenizer(None, module, "DipMonitor", module.net) is tiny_tokenizer
    assert resolve_tokenizer(other, module, "DipMonitor", module.net) is other


def test_the_tokenizer_saved_with_the_model_is_found_through_name_or_path(tmp_path, tiny_tokenizer, tiny_pairs):
    make_tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert model.name_or_path == str(tmp_path / "model")
    expected = DipProbe(tiny_pairs, ("logit",)).run(model, tiny_tokenizer).scalars  # the tokenizer passed by hand
    module = UserModule(model)
    monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",), log_figures=False)
    fit(tmp_path / "run", module, [monitor], max_steps=1)
    found = resolve_tokenizer(None, module, "DipMonitor", model)
    assert found is not tiny_tokenizer and found.get_vocab() == tiny_tokenizer.get_vocab()
    assert {k: v for k, v in monitor.history[0].items() if k != "step"} == pytest.approx(expected, nan_ok=True)


@pytest.mark.parametrize("callback", ["DipMonitor", "CompressionRetention"])
def test_no_tokenizer_anywhere_fails_at_setup_listing_what_was_tried(tmp_path, tiny_pairs, callback):
    make_tiny_model("llama").save_pretrained(tmp_path / "model")  # the model alone, no tokenizer files
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    monitor = (
        DipMonitor(tiny_pairs, lenses=("logit",))
        if callback == "DipMonitor"
        else CompressionRetention(tiny_pairs, "rtn:bits=4")
    )
    with pytest.raises(MonitorSetupError) as info:
        fit(tmp_path, MustNotTrain(model, notes="not a tokenizer"), [monitor])
    message = str(info.value)
    assert message.startswith(f"{callback} needs a tokenizer and found none. Tried: ")
    assert "the tokenizer= argument (not given)" in message
    assert "MustNotTrain.tokenizer (absent)" in message
    assert "the other attributes of MustNotTrain (" in message and "lr, notes" in message
    assert f"AutoTokenizer.from_pretrained({str(tmp_path / 'model')!r}, local_files_only=True) failed (" in message


def test_a_model_built_from_a_config_says_it_has_no_path_to_load_from(tiny_tokenizer):
    module = UserModule(make_tiny_model("llama"), tokenizer="gpt2")
    with pytest.raises(MonitorSetupError) as info:
        resolve_tokenizer(None, module, "DipMonitor", module.net)
    message = str(info.value)
    assert "UserModule.tokenizer (a str, not a PreTrainedTokenizerBase)" in message
    assert "skipped: the LlamaForCausalLM has an empty name_or_path" in message


class TwoModels(UserModule):
    """A module holding two HF models: the one it trains first (``net``, found first by the default search), and the
    one a user wants probed under ``inner.student`` (never trained here)."""

    def __init__(self, net: torch.nn.Module, student: torch.nn.Module, tokenizer) -> None:
        super().__init__(net, tokenizer=tokenizer)
        self.inner = torch.nn.Module()
        self.inner.student = student


def probe_scalars(model: torch.nn.Module, tokenizer, pairs) -> dict[str, float]:
    """The monitor's overall logit-lens scalars recomputed from :func:`dipreg.trajectories` of ``model``."""
    traj = dipreg.trajectories(model, tokenizer, pairs, prompt="raw")
    return {
        "dip/logit/accuracy": float(traj.correct.float().mean()),
        "dip/logit/max_wrong_dip": float(traj.max_wrong_dip.double().mean()),
        "dip/logit/commit_layer_frac": float(traj.commit_layer_frac.double().mean()),
    }


@pytest.mark.parametrize("where", ["inner.student", lambda module: module.inner.student], ids=["path", "getter"])
def test_model_given_as_an_attribute_path_or_a_getter_is_the_one_probed(tmp_path, tiny_tokenizer, tiny_pairs, where):
    student = make_tiny_model("llama", seed=0)
    module = TwoModels(make_tiny_model("llama", seed=1), student, tiny_tokenizer)
    want = probe_scalars(student, tiny_tokenizer, tiny_pairs)
    assert want != probe_scalars(module.net, tiny_tokenizer, tiny_pairs)  # the default search would find net
    monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",), model=where, prompt="raw", log_figures=False)
    fit(tmp_path, module, [monitor], max_steps=2)
    assert [int(h["step"]) for h in monitor.history] == [0, 2]
    for entry in monitor.history:
        assert {k: entry[k] for k in want} == pytest.approx(want, abs=1e-6)


class WithValidation(UserModule):
    def validation_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss


class Reference(pl.Callback):
    """Recomputes the monitor's scalars from the live model at every validation end (before the monitor runs)."""

    def __init__(self, tokenizer, pairs) -> None:
        self.tokenizer, self.pairs, self.seen = tokenizer, pairs, {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen[trainer.global_step] = probe_scalars(pl_module.net, self.tokenizer, self.pairs)


@pytest.mark.parametrize("on_validation_end", [True, False])
def test_probe_on_validation_end_probes_after_each_validation(tmp_path, tiny_tokenizer, tiny_pairs, on_validation_end):
    """Validation every 2 steps of 6; probes every 10 steps: only the validation ends add probes between the one before
    training and the one at the end, each of the weights at that step."""
    module = WithValidation(make_tiny_model("llama"), tokenizer=tiny_tokenizer)
    reference = Reference(tiny_tokenizer, tiny_pairs)
    monitor = DipMonitor(
        tiny_pairs,
        every_n_steps=10,
        lenses=("logit",),
        prompt="raw",
        log_figures=False,
        on_validation_end=on_validation_end,
    )
    fit(tmp_path, module, [reference, monitor], max_steps=6, validate_every=2)
    assert sorted(reference.seen) == [2, 4, 6]
    steps = [int(h["step"]) for h in monitor.history]
    assert steps == ([0, 2, 4, 6] if on_validation_end else [0, 6])
    for entry in monitor.history[1:-1]:
        want = reference.seen[int(entry["step"])]
        assert {k: entry[k] for k in want} == pytest.approx(want, abs=1e-6)
    assert reference.seen[2] != reference.seen[4]  # the weights moved between validations
