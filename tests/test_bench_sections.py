"""The monitor bench section runs a real (tiny) training twice and reports a ratio; the CLI filters sections."""

import math

from dipreg.bench import BenchContext
from dipreg.callbacks import bench_monitor
from dipreg.cli import main


def test_monitor_section_reports_a_finite_overhead(llama_tiny, tiny_tokenizer, tiny_pairs, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_monitor, "TRAIN_STEPS", 4)
    monkeypatch.setattr(bench_monitor, "EVERY_N_STEPS", 2)
    params = {n: p.detach().clone() for n, p in llama_tiny.named_parameters()}
    [ratio] = bench_monitor.monitor_section(BenchContext(llama_tiny, tiny_tokenizer, tiny_pairs, 4, 1))
    assert ratio.name == "monitor_overhead" and math.isfinite(ratio.value) and ratio.value > -1
    assert "with monitor" in ratio.detail
    assert all(p.equal(params[n]) for n, p in llama_tiny.named_parameters())  # trained a copy
    assert list(tmp_path.iterdir()) == []  # nothing left in the working directory


def test_unknown_bench_section_is_named(tmp_path, capsys):
    assert main(["bench", "--only", "lens,warp", "--out", str(tmp_path)]) == 2
    assert "warp" in capsys.readouterr().err
