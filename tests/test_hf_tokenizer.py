"""The HF TrainerCallback finds its tokenizer as the Lightning monitor does: argument, the Trainer's
processing_class, else the tokenizer saved with the model (its name_or_path, local files only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

from dipreg.callbacks.hf import DipMonitorCallback
from dipreg.callbacks.probe import DipProbe, MonitorSetupError


def begin(monitor: DipMonitorCallback, tmp_path, **kwargs) -> None:
    """``on_train_begin`` as the HF Trainer calls it at step 0 (one process)."""
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), process_index=0, world_size=1)
    monitor.on_train_begin(args, TrainerState(), TrainerControl(), **kwargs)


def test_the_tokenizer_saved_with_the_model_is_found_through_name_or_path(tmp_path, tiny_tokenizer, tiny_pairs):
    make_tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    expected = DipProbe(tiny_pairs, ("logit",)).run(model, tiny_tokenizer).scalars  # the tokenizer passed by hand
    monitor = DipMonitorCallback(tiny_pairs, lenses=("logit",), log_dir=str(tmp_path / "tb"))
    begin(monitor, tmp_path, model=model)  # no tokenizer=, no processing_class
    assert monitor.tokenizer is not tiny_tokenizer and monitor.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert {k: v for k, v in monitor.history[0].items() if k != "step"} == pytest.approx(expected, nan_ok=True)
    monitor.writer.close()


def test_processing_class_comes_before_the_model_path(tmp_path, tiny_tokenizer, tiny_pairs):
    model = make_tiny_model("llama")  # built from a config: no path to load a tokenizer from
    monitor = DipMonitorCallback(tiny_pairs, lenses=("logit",))
    assert monitor._tokenizer({"model": model, "processing_class": tiny_tokenizer}) is tiny_tokenizer


def test_no_tokenizer_anywhere_lists_what_was_tried(tmp_path, tiny_pairs):
    make_tiny_model("llama").save_pretrained(tmp_path / "model")  # the model alone, no tokenizer files
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    monitor = DipMonitorCallback(tiny_pairs, lenses=("logit",), log_dir=str(tmp_path / "tb"))
    with pytest.raises(MonitorSetupError) as info:
        begin(monitor, tmp_path, model=model)
    message = str(info.value)
    assert message.startswith("DipMonitorCallback needs a tokenizer and found none. Tried: ")
    assert "the tokenizer= argument (not given); the Trainer's processing_class (not given)" in message
    assert f"AutoTokenizer.from_pretrained({str(tmp_path / 'model')!r}, local_files_only=True) failed (" in message
    with pytest.raises(MonitorSetupError, match="skipped: the LlamaForCausalLM has an empty name_or_path"):
        monitor._tokenizer({"model": make_tiny_model("llama")})


def test_a_processors_tokenizer_is_used(tmp_path, tiny_tokenizer, tiny_pairs):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tiny_tokenizer)
    model = make_tiny_model("llama")
    expected = DipProbe(tiny_pairs, ("logit",)).run(model, tiny_tokenizer).scalars
    monitor = DipMonitorCallback(tiny_pairs, lenses=("logit",), log_dir=str(tmp_path / "tb"))
    begin(monitor, tmp_path, model=model, processing_class=processor)
    assert monitor.tokenizer is None and monitor._tokenizer({"processing_class": processor}) is tiny_tokenizer
    assert {k: v for k, v in monitor.history[0].items() if k != "step"} == pytest.approx(expected, nan_ok=True)
    monitor.writer.close()


def test_a_processing_class_without_a_tokenizer_is_named_in_the_error(tiny_pairs):
    from transformers import CLIPImageProcessorPil

    monitor = DipMonitorCallback(tiny_pairs, lenses=("logit",))
    with pytest.raises(MonitorSetupError, match=r"the Trainer's processing_class \(a CLIPImageProcessorPil, neither"):
        monitor._tokenizer({"model": make_tiny_model("llama"), "processing_class": CLIPImageProcessorPil()})
