"""Where DipMonitor and CompressionRetention find the tokenizer of a user's own LightningModule."""

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


def fit(tmp_path: Path, module: pl.LightningModule, callbacks: list, max_steps: int = 2) -> None:
    data = DataLoader(list(torch.randint(2, 40, (8, 12), generator=torch.Generator().manual_seed(0))), batch_size=2)
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
    ).fit(module, data)


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
