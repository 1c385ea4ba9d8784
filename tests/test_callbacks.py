"""DipMonitor and CompressionRetention dropped into a user's own LightningModule (not DipRegModule)."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_tiny_model, quiet_training_args
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from peft import LoraConfig, get_peft_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from dipreg.callbacks import CompressionRetention, DipMonitor, MonitorSetupError
from dipreg.cli import main
from dipreg.eval.degradation.ledger import state_checksum
from dipreg.stimuli import MinimalPair, StimulusError, save_pairs


class UserLoRAModule(pl.LightningModule):
    """What a user writes: an HF model wrapped in PEFT LoRA, plain next-token CE, their own optimizer."""

    def __init__(self, tokenizer, lora: bool = True, lr: float = 1e-2) -> None:
        super().__init__()
        model = make_tiny_model("llama")
        self.net = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])) if lora else model
        self.tokenizer = tokenizer
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class NoHFModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):  # pragma: no cover - must never run
        raise AssertionError("training must not start")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_batches(n: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(2, 40, (n, 12), generator=generator)
    return DataLoader(list(data), batch_size=2)


def trainer(tmp_path: Path, max_steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def read_events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_monitor_in_a_user_lora_module_writes_scalars_histograms_and_figures(tmp_path, tiny_tokenizer, tiny_pairs):
    monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",))
    module = UserLoRAModule(tiny_tokenizer)
    trainer(tmp_path, 4, [monitor], enable_checkpointing=False).fit(module, token_batches())
    events = read_events(tmp_path / "tb" / "version_0")
    tags = events.Tags()
    assert "dip/logit/accuracy" in tags["scalars"] and "dip/logit/family/negation/max_wrong_dip" in tags["scalars"]
    assert [e.step for e in events.Scalars("dip/logit/max_wrong_dip")] == [0, 2, 4]
    assert {"dip/trajectories", "dip/history"} <= set(tags["images"])
    assert "dip/logit/max_wrong_dip_items" in tags["histograms"]
    logged = events.Scalars("dip/logit/accuracy")[-1].value
    history = json.loads((tmp_path / "tb" / "version_0" / "dip_history.json").read_text())["history"]
    assert history[-1]["dip/logit/accuracy"] == pytest.approx(logged)
    assert module.net.training is True  # the probe restored training mode


def test_resumed_run_continues_the_history_without_gaps_or_duplicates(tmp_path, tiny_tokenizer, tiny_pairs):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",), log_figures=False)
    trainer(tmp_path / "a", 3, [first, ckpt]).fit(UserLoRAModule(tiny_tokenizer), token_batches())  # "killed" at 3
    path = next((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    second = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",), log_figures=False)
    trainer(tmp_path / "b", 6, [second]).fit(UserLoRAModule(tiny_tokenizer), token_batches(), ckpt_path=path)
    assert [int(h["step"]) for h in second.history] == [0, 2, 4, 6]


def test_module_without_an_hf_model_fails_at_setup(tmp_path, tiny_tokenizer, tiny_pairs):
    with pytest.raises(MonitorSetupError, match="No Hugging Face PreTrainedModel"):
        trainer(tmp_path, 2, [DipMonitor(tiny_pairs, tokenizer=tiny_tokenizer, lenses=("logit",))]).fit(
            NoHFModule(), token_batches()
        )


def test_pairs_the_tokenizer_cannot_audit_fail_at_setup(tmp_path, tiny_tokenizer):
    bad = MinimalPair("bad-7", "is it cold ?", "is it hot ?", " ice cold", " No", "negation", False)
    module = UserLoRAModule(tiny_tokenizer)
    with pytest.raises(StimulusError, match="bad-7"):
        trainer(tmp_path, 2, [DipMonitor([bad], lenses=("logit",))]).fit(module, token_batches())


def test_causal_every_and_figures_every_thin_out_the_expensive_parts(tmp_path, tiny_tokenizer, tiny_pairs):
    monitor = DipMonitor(tiny_pairs, every_n_steps=1, lenses=("logit", "causal"), causal_every=2, figures_every=3)
    trainer(tmp_path, 4, [monitor], enable_checkpointing=False).fit(UserLoRAModule(tiny_tokenizer), token_batches())
    events = read_events(tmp_path / "tb" / "version_0")
    assert [e.step for e in events.Scalars("dip/logit/max_wrong_dip")] == [0, 1, 2, 3, 4]
    assert [e.step for e in events.Scalars("dip/causal/max_wrong_dip")] == [0, 2, 4]
    assert [e.step for e in events.Images("dip/trajectories")] == [0, 3]
    assert [e.step for e in events.Histograms("dip/logit/max_wrong_dip_items")] == [0, 3]
    assert [("dip/causal/accuracy" in h) for h in monitor.history] == [True, False, True, False, True]


def test_bad_monitor_arguments_are_rejected_at_construction():
    from dipreg.callbacks.hf import DipMonitorCallback

    with pytest.raises(MonitorSetupError, match="every_n_steps"):
        DipMonitor("core", every_n_steps=0)
    with pytest.raises(MonitorSetupError, match="figures_every"):
        DipMonitor("core", figures_every=0)
    with pytest.raises(MonitorSetupError, match="add another lens"):
        DipMonitor("core", lenses=("causal",), causal_every=2)
    with pytest.raises(MonitorSetupError, match="causal_every"):
        DipMonitorCallback("core", causal_every=0)
    with pytest.raises(MonitorSetupError, match="'checkpoint' or 'validation_end'"):
        CompressionRetention("core", on="epoch")  # type: ignore[arg-type]


def retention_pairs() -> list[MinimalPair]:
    """24 pairs in the tiny vocabulary: enough items that the tiny model gets some right, a degradation flips some,
    and the dip tertiles and the Mann-Whitney test have values (4 pairs leave them empty or NaN)."""
    subjects = ("Alice", "Bob", "the cat", "the dog")
    words = (("good", "bad"), ("right", "wrong"), ("hot", "cold"))
    answers = ((" Yes", " No"), (" True", " False"))
    return [
        MinimalPair(
            id=f"r{i}",
            ctx_a=f"{subject} is {a} . is it {a} ? Answer :",
            ctx_b=f"{subject} is {b} . is it {a} ? Answer :",
            t_pos=pos,
            t_neg=neg,
            family="value_flip" if i % 2 else "negation",
            safety=i % 3 == 0,
        )
        for i, (subject, (a, b), (pos, neg)) in enumerate(itertools.product(subjects, words, answers))
    ]


#: The five scalars CompressionRetention logs per degradation, and where ``dipreg degrade`` writes each in its JSON.
RETENTION_SCALARS = {
    "accuracy": lambda result: result["accuracy"],
    "flips": lambda result: result["n_flips"],
    "dip_high_flip_rate": lambda result: result["stratification"]["dip"]["high_tertile_flip_rate"],
    "dip_low_flip_rate": lambda result: result["stratification"]["dip"]["low_tertile_flip_rate"],
    "dip_mw_p": lambda result: result["stratification"]["dip"]["mw_p"],
    "margin_mw_p": lambda result: result["stratification"]["margin"]["mw_p"],
}


def test_compression_retention_logs_what_dipreg_degrade_writes_and_restores_the_weights(tmp_path, tiny_tokenizer):
    """The scalars the callback logged to TensorBoard at a checkpoint equal the JSON of the ``dipreg degrade`` command
    run on that checkpoint's weights (saved, reloaded by the CLI) and the same pairs file; the JSON's flip counts are
    recounted from its own per-item lists."""
    pairs, ops = retention_pairs(), "late_svd:rank=2,rtn:bits=3"
    retention = CompressionRetention(pairs, ops, on="checkpoint", prompt="raw")
    module = UserLoRAModule(tiny_tokenizer, lora=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(tmp_path, 2, [retention, ckpt]).fit(module, token_batches())
    events = read_events(tmp_path / "tb" / "version_0")
    logged = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"] if tag.startswith("retention/")}
    assert {len(values) for values in logged.values()} == {1} and logged, "one evaluation, at step 2"
    before = state_checksum(module.net)
    again = retention.evaluate(module)
    assert again == pytest.approx({k: v for k, v in retention.history[-1].items() if k != "step"}, nan_ok=True)
    assert state_checksum(module.net) == before
    module.net.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    save_pairs(pairs, tmp_path / "pairs.jsonl")
    argv = ["degrade", "--model", str(tmp_path / "model"), "--pairs", str(tmp_path / "pairs.jsonl"), "--ops", ops]
    assert main([*argv, "--prompt", "raw", "--out", str(tmp_path / "degrade")]) == 0
    report = json.loads((tmp_path / "degrade" / "degrade.json").read_text())
    intact = report["intact"]["items"]["correct"]
    want = {"retention/intact_accuracy": report["intact"]["summary"]["all"]["accuracy"]}
    for label, result in report["operators"].items():
        flips = [a and not b for a, b in zip(intact, result["items"]["correct"], strict=True)]
        assert result["n_flips"] == sum(flips) > 0
        want |= {f"retention/{label}/{name}": read(result) for name, read in RETENTION_SCALARS.items()}
    assert all(math.isfinite(v) for v in want.values()), want
    assert {tag: values[0].value for tag, values in logged.items()} == pytest.approx(want, abs=1e-6)


def test_monitor_and_retention_ride_along_a_dip_regularised_fit(tmp_path, tiny_tokenizer, tiny_pairs):
    from conftest import make_tiny_model

    from dipreg import DipRegModule, PairDataModule
    from dipreg.losses import WrongMarginHinge

    path = str(save_pairs(tiny_pairs, tmp_path / "pairs.jsonl"))
    module = DipRegModule(
        model=make_tiny_model("llama"),
        tokenizer=tiny_tokenizer,
        r=4,
        alpha=8,
        aux_losses=[WrongMarginHinge(weight=0.2)],
    )
    monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",))
    retention = CompressionRetention(tiny_pairs, "late_drop,rtn:bits=4", on="validation_end")
    trainer(tmp_path, 4, [monitor, retention], val_check_interval=2, limit_val_batches=1, log_every_n_steps=1).fit(
        module, PairDataModule(train=path, val=[path], batch_size=4)
    )
    assert [int(h["step"]) for h in monitor.history] == [0, 2, 4]
    assert [int(h["step"]) for h in retention.history] == [2, 4]
    events = read_events(tmp_path / "tb" / "version_0")
    assert "retention/late_drop/accuracy" in events.Tags()["scalars"]
    assert "train/hinge" in events.Tags()["scalars"]


def test_probe_gives_nan_for_unreadable_items_and_keeps_every_other_mean(monkeypatch, tiny_pairs):
    from dipreg.callbacks import probe as probe_module
    from dipreg.callbacks.probe import DipProbe
    from dipreg.trajectory import Trajectories

    margin_a = torch.linspace(0.1, 1.0, 8).repeat(4, 1)
    margin_b = -margin_a.clone()  # every item correct, no dip, commit 0
    margin_a[0, 3] = float("nan")  # neg-0 (negation): non-finite
    margin_a[2], margin_b[2] = 0.0, 0.0  # role-0 (role_binding): exactly 0 everywhere

    def fake(model, tokenizer, pairs, lenses, **kwargs):
        return {"logit": Trajectories(list(pairs), "logit", margin_a[: len(pairs)], margin_b[: len(pairs)])}

    monkeypatch.setattr(probe_module, "trajectories_by_lens", fake)
    result = DipProbe(tiny_pairs, ("logit",)).run(torch.nn.Linear(1, 1), tokenizer=None)
    scalars = result.scalars
    for key in ("accuracy", "max_wrong_dip", "family/negation/accuracy", "family/role_binding/commit_layer_frac"):
        assert math.isnan(scalars[f"dip/logit/{key}"]), key
    assert scalars["dip/logit/family/value_flip/accuracy"] == 1.0  # a subset without unreadable items keeps its mean
    assert scalars["dip/logit/safety/max_wrong_dip"] == 0.0
    assert (result.non_finite, result.all_zero) == ({"logit": 1}, {"logit": 1})
    message = result.unreadable_message(len(tiny_pairs))
    assert message is not None and message.startswith("logit: 1 non-finite, 1 exactly 0 at every layer (of 4 probe")


STATISTICS = ("accuracy", "max_wrong_dip", "commit_layer_frac", "late_binding_rate")


def read_layout(events: EventAccumulator) -> dict[str, dict[str, list[str]]]:
    """The custom-scalars layout written to the events, as ``{category: {chart: [tag regex, ...]}}``."""
    from tensorboard.plugins.custom_scalar.layout_pb2 import Layout

    (event,) = events.Tensors("custom_scalars__config__")  # written once per run
    layout = Layout.FromString(event.tensor_proto.string_val[0])
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


def check_layout_and_subsets(events: EventAccumulator, lenses: tuple[str, ...], pairs: list[MinimalPair]) -> None:
    """Safety tags exactly when there are safety items; the layout charts every logged metric, per lens and per
    family, and each of its entries (a regex, as TensorBoard reads it) names exactly one logged tag."""
    logged = set(events.Tags()["scalars"])
    subsets = ["", *(f"family/{f}/" for f in sorted({p.family for p in pairs}))]
    if any(p.safety for p in pairs):
        subsets.append("safety/")
    assert {t for t in logged if "/safety/" in t} == {
        f"dip/{lens}/safety/{stat}" for lens in lenses for stat in STATISTICS if "safety/" in subsets
    }
    charts = {title: tags for category in read_layout(events).values() for title, tags in category.items()}
    for tags in charts.values():
        for regex in tags:
            assert len([t for t in logged if re.fullmatch(regex, t)]) == 1, regex
    per_metric = [[f"dip/{lens}/{stat}" for lens in lenses] for stat in STATISTICS]  # every lens on one chart
    per_family = [[f"dip/{lens}/{prefix}{stat}" for prefix in subsets] for lens in lenses for stat in STATISTICS]
    written = sorted(sorted(tag.strip("^$") for tag in tags) for tags in charts.values())
    assert written == sorted(map(sorted, per_metric + per_family))
    assert {"held-out accuracy", "mean max_wrong_dip", "mean commit_layer_frac", "late-binding rate"} <= set(charts)


@pytest.mark.parametrize("with_safety", [False, True])
def test_tensorboard_gets_a_custom_scalars_layout_and_no_tags_for_empty_subsets(
    tmp_path, tiny_tokenizer, tiny_pairs, with_safety
):
    pairs = tiny_pairs if with_safety else [p for p in tiny_pairs if not p.safety]
    monitor = DipMonitor(pairs, every_n_steps=2, lenses=("logit", "causal"))
    trainer(tmp_path, 2, [monitor], enable_checkpointing=False).fit(UserLoRAModule(tiny_tokenizer), token_batches())
    events = read_events(tmp_path / "tb" / "version_0")
    check_layout_and_subsets(events, ("logit", "causal"), pairs)
    for tag in ("dip/trajectories", "dip/history"):  # one column of panels, narrow enough for an image card
        image = events.Images(tag)[-1]
        assert image.width <= 500 and image.height > image.width, tag


def test_hf_trainer_twin_writes_the_same_layout_and_no_empty_subsets(tmp_path, tiny_tokenizer, tiny_pairs):
    from transformers import Trainer

    from dipreg.callbacks.hf import DipMonitorCallback

    pairs = [p for p in tiny_pairs if not p.safety]
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 40, (4, 12)).tolist()]
    args = quiet_training_args(tmp_path / "out", 1)
    monitor = DipMonitorCallback(pairs, tokenizer=tiny_tokenizer, every_n_steps=1, lenses=("logit", "causal"))
    Trainer(model=make_tiny_model("llama"), args=args, train_dataset=data, callbacks=[monitor]).train()
    events = read_events(tmp_path / "out" / "runs")
    assert [e.step for e in events.Scalars("dip/causal/accuracy")] == [0, 1]
    check_layout_and_subsets(events, ("logit", "causal"), pairs)
    assert events.Images("dip/trajectories")[-1].width <= 500


def chat_tokenizer(tokenizer):
    """A copy of the tiny tokenizer with a chat template, so that ``prompt="auto"`` means chat, not raw."""
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }} ? {% endfor %}"
    return chat


def test_monitor_with_prompt_none_probes_the_datamodules_raw_prompts(tmp_path, tiny_tokenizer, tiny_pairs):
    from dipreg import DipRegModule, PairDataModule, trajectories
    from dipreg.callbacks.probe import find_hf_model

    tokenizer = chat_tokenizer(tiny_tokenizer)  # "auto" would render chat here
    path = str(save_pairs(tiny_pairs, tmp_path / "pairs.jsonl"))
    module = DipRegModule(model=make_tiny_model("llama"), tokenizer=tokenizer, r=4, alpha=8)
    model = find_hf_model(module)
    expected = {style: trajectories(model, tokenizer, tiny_pairs, prompt=style) for style in ("raw", "chat")}
    monitor = DipMonitor(tiny_pairs, every_n_steps=5, lenses=("logit",), prompt=None)
    retention = CompressionRetention(tiny_pairs, "rtn:bits=4", on="validation_end")
    trainer(tmp_path, 1, [monitor, retention], limit_val_batches=0).fit(
        module, PairDataModule(train=path, val=[path], batch_size=4, prompt="raw")
    )
    assert monitor.prompt is None and monitor.resolved_prompt is not None
    assert monitor.resolved_prompt.style == "raw" and monitor.probe.prompt.style == "raw"
    assert retention.prompt is None and retention.resolved_prompt.style == "raw"
    step0 = monitor.history[0]
    assert step0["step"] == 0
    raw, chat = expected["raw"], expected["chat"]
    assert step0["dip/logit/max_wrong_dip"] == pytest.approx(float(raw.max_wrong_dip.double().mean()), abs=1e-6)
    assert step0["dip/logit/accuracy"] == pytest.approx(float(raw.correct.float().mean()))
    assert step0["dip/logit/commit_layer_frac"] == pytest.approx(float(raw.commit_layer_frac.double().mean()))
    # the chat rendering gives other numbers, so the equality above says which prompts were probed
    assert float(chat.max_wrong_dip.double().mean()) != pytest.approx(step0["dip/logit/max_wrong_dip"], abs=1e-6)


def test_an_explicit_prompt_wins_and_without_a_datamodule_prompt_it_is_auto(tmp_path, tiny_tokenizer, tiny_pairs):
    from types import SimpleNamespace

    from dipreg.callbacks.probe import resolve_prompt
    from dipreg.prompting import PromptFormat

    raw_data = SimpleNamespace(datamodule=SimpleNamespace(prompt=PromptFormat("raw")))
    assert resolve_prompt("chat", raw_data, "DipMonitor").style == "chat"
    assert resolve_prompt(None, raw_data, "DipMonitor").style == "raw"
    assert resolve_prompt(None, SimpleNamespace(datamodule=SimpleNamespace(prompt="chat")), "x").style == "chat"
    assert resolve_prompt(None, SimpleNamespace(datamodule=None), "DipMonitor").style == "auto"
    assert resolve_prompt(None, None, "DipMonitor").style == "auto"
    with pytest.warns(UserWarning, match=r"Data\.prompt is 'Q: \{q\}'.*prompt='auto'"):
        Data = type("Data", (), {"prompt": "Q: {q}"})
        assert resolve_prompt(None, SimpleNamespace(datamodule=Data()), "DipMonitor").style == "auto"
    with pytest.raises(MonitorSetupError, match="prompt must be one of auto, raw, chat, fewshot or None"):
        DipMonitor(tiny_pairs, prompt="plain")
    with pytest.raises(MonitorSetupError, match="prompt must be one of"):
        CompressionRetention(tiny_pairs, prompt="plain")
    # a fit on plain token batches (no datamodule): the monitor falls back to auto
    monitor = DipMonitor(tiny_pairs, every_n_steps=5, lenses=("logit",), log_figures=False)
    trainer(tmp_path, 1, [monitor]).fit(UserLoRAModule(tiny_tokenizer), token_batches())
    assert monitor.resolved_prompt == PromptFormat("auto")


def test_every_probe_logs_one_line_when_it_starts_and_one_when_it_ends(tmp_path, tiny_tokenizer, tiny_pairs, caplog):
    import logging

    # Lightning's logger propagates to the root logger that caplog listens on only when the root had handlers when
    # Lightning was imported; otherwise attach caplog's handler to it directly (never both: records would double).
    lightning_logger = logging.getLogger("lightning.pytorch")
    attach = not lightning_logger.propagate
    if attach:
        lightning_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit", "causal"), log_figures=False)
            trainer(tmp_path, 4, [monitor]).fit(UserLoRAModule(tiny_tokenizer), token_batches())
    finally:
        if attach:
            lightning_logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DipMonitor: ")]
    starts = [line for line in lines if "probing at step" in line]
    ends = [line for line in lines if re.fullmatch(r"DipMonitor: probe at step \d+ took \d+\.\d s", line)]
    steps = [int(h["step"]) for h in monitor.history]
    assert starts == [f"DipMonitor: probing at step {s}: {len(tiny_pairs)} pairs, lenses logit+causal" for s in steps]
    assert [int(re.search(r"step (\d+)", line).group(1)) for line in ends] == steps
