"""The monitor bench section runs a real (tiny) training twice and reports a ratio; the CLI filters sections."""

import math

import pytest

from dipreg.bench import monitor as bench_monitor
from dipreg.bench.core import BenchContext
from dipreg.cli import main


def test_monitor_section_reports_both_step_sizes(llama_tiny, tiny_tokenizer, tiny_pairs, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_monitor, "TRAIN_STEPS", 4)
    monkeypatch.setattr(bench_monitor, "EVERY_N_STEPS", 2)
    monkeypatch.setattr(bench_monitor, "WARMUP_STEPS", 1)
    monkeypatch.setattr(bench_monitor, "SFT_STEP", (2, 16))
    monkeypatch.setattr(bench_monitor, "SMALL_STEP", (1, 8))
    params = {n: p.detach().clone() for n, p in llama_tiny.named_parameters()}
    sft, small = bench_monitor.monitor_section(BenchContext(llama_tiny, tiny_tokenizer, tiny_pairs, 4, 1))
    assert (sft.name, small.name) == ("monitor_overhead", "monitor_overhead_small_step")
    assert math.isfinite(sft.value) and sft.value > -1 and sft.met == (sft.value <= 0.05)
    assert small.met is None  # no target on the scaling line
    assert "batch 2×16" in sft.detail and "batch 1×8" in small.detail
    assert "3 probes took" in sft.detail  # steps 0, 2 and 4
    assert all(p.equal(params[n]) for n, p in llama_tiny.named_parameters())  # trained a copy
    assert list(tmp_path.iterdir()) == []  # nothing left in the working directory


def test_probe_share_is_probe_time_over_the_rest_of_the_fit():
    run = bench_monitor.OverheadRun((8, 256), bare_s=100.0, monitored_s=106.0, probe_s=6.0, probes=3)
    assert run.overhead == pytest.approx(0.06) and run.probe_share == pytest.approx(0.06)


def test_unknown_bench_section_is_named(tmp_path, capsys):
    assert main(["bench", "--only", "lens,warp", "--out", str(tmp_path)]) == 2
    assert "warp" in capsys.readouterr().err
