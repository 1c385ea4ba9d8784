"""`dipreg bench` end to end on a tiny model: every section runs, ``bench.json`` has exactly the documented keys,
every ratio equals the ratio of the two timings it reports, and a fast path slowed on purpose lowers its ratio.

Timings come from the real clock, scaled by :data:`CLOCK_SCALE` inside the bench modules so that the three
decimals the details print keep about six significant digits of a tiny model's milliseconds (ratios are
unchanged by the scale). Nothing here asserts a time: only how reported numbers relate to each other.
"""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest

from dipreg.bench import causal as bench_causal
from dipreg.bench import core as bench_core
from dipreg.bench import hinge as bench_hinge
from dipreg.bench import lens as bench_lens
from dipreg.bench import monitor as bench_monitor
from dipreg.bench import run as bench_run
from dipreg.bench.core import BenchContext
from dipreg.bench.run import run_bench
from dipreg.cli import main
from dipreg.stimuli import save_pairs
from tests.conftest import make_tiny_model

CLOCK_SCALE = 1000.0
BENCHED = ["lens", "causal", "hinge", "monitor"]  # every section of dipreg.bench.run.SECTIONS when this was written

#: ratio name -> (regex reading the two reported timings from its detail, offset): value == a / b + offset.
#: The detail strings are the published record of what each ratio divides; these patterns are their spec.
REPORTED = {
    "lens_vs_naive_speedup": (r"naive ([\d.]+)s \(1 run\) / lens ([\d.]+)s", 0.0),
    "lens_vs_forward_ratio": (r"lens ([\d.]+)s / forward ([\d.]+)s", 0.0),
    "causal_vs_naive_speedup": (r"naive ([\d.]+)s \(1 run\) / causal ([\d.]+)s", 0.0),
    "causal_vs_lens_ratio": (r"causal-lens trajectories ([\d.]+)s / logit-lens trajectories ([\d.]+)s", 0.0),
    "hinge_overhead": (r"dip_reg ([\d.]+)s / output_only ([\d.]+)s", -1.0),
    "hinge_causal_overhead": (r"dip_reg_causal ([\d.]+)s / output_only ([\d.]+)s", -1.0),
    "hinge_tuned_overhead": (r"dip_reg_tuned ([\d.]+)s / output_only ([\d.]+)s", -1.0),
    "monitor_probe_share": (r"probes ([\d.]+)s / rest of the fit ([\d.]+)s", 0.0),
    "monitor_overhead": (r"([\d.]+)s with monitor .* vs ([\d.]+)s without", -1.0),
    "monitor_overhead_small_step": (r"([\d.]+)s with monitor .* vs ([\d.]+)s without", -1.0),
}
bench_run_load_model = bench_run.load_model
RUN_KEYS = {"details", "model", "pairs", "repeats", "batch_size", "naive_pairs", "torch_threads", "section_seconds"}
#: Reported values that are not a ratio of two timings (checked in tests/test_precision.py).
NOT_TIMED = {"lens_bf16_vs_fp32_maxdiff"}


def _timings(name: str, detail: str) -> tuple[float, float, float, float]:
    """The two timings a ratio reports and the half-unit of their last printed digit."""
    pattern, _ = REPORTED[name]
    match = re.search(pattern, detail)
    assert match, f"{name}: {detail!r} does not report its two timings"
    a, b = match.group(1), match.group(2)
    return float(a), float(b), 0.5 * 10.0 ** -len(a.partition(".")[2]), 0.5 * 10.0 ** -len(b.partition(".")[2])


def assert_ratio_of_reported_timings(name: str, value: float, detail: str) -> None:
    """``value`` lies within what the printed (rounded) timings allow for ``a / b + offset``."""
    a, b, ha, hb = _timings(name, detail)
    offset = REPORTED[name][1]
    low, high = (a - ha) / (b + hb) + offset, (a + ha) / (b - hb) + offset
    assert low - 1e-12 <= value <= high + 1e-12, f"{name}={value} but its detail reports {a} / {b} ({detail!r})"


def _target_met(target: str, value: float) -> bool | None:
    """What a published target string ("<= 1.15", ">= 5", or none) says about ``value``."""
    match = re.fullmatch(r"(<=|>=) ([\d.]+)", target)
    if match is None:
        return None
    bound = float(match.group(2))
    return value <= bound if match.group(1) == "<=" else value >= bound


@pytest.fixture
def scaled_clock(monkeypatch):
    """Every bench module reads a clock that runs CLOCK_SCALE times faster (and sleeps on the real one)."""
    clock = SimpleNamespace(perf_counter=lambda: CLOCK_SCALE * time.perf_counter(), sleep=time.sleep)
    for module in (bench_core, bench_causal, bench_hinge, bench_monitor):
        monkeypatch.setattr(module, "time", clock)


@pytest.fixture
def small_monitor_runs(monkeypatch):
    monkeypatch.setattr(bench_monitor, "TRAIN_STEPS", 4)
    monkeypatch.setattr(bench_monitor, "EVERY_N_STEPS", 2)
    monkeypatch.setattr(bench_monitor, "WARMUP_STEPS", 1)
    monkeypatch.setattr(bench_monitor, "SFT_STEP", (2, 16))
    monkeypatch.setattr(bench_monitor, "SMALL_STEP", (1, 8))


def test_every_section_runs_and_bench_json_reports_ratios_of_its_own_timings(
    tmp_path, tiny_tokenizer, tiny_pairs, scaled_clock, small_monitor_runs, monkeypatch
):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    pairs_file = save_pairs(tiny_pairs, tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path / "tiny-llama")  # the monitor's scratch files must not land in the working dir
    before = sorted(p.name for p in model_dir.iterdir())
    out = tmp_path / "bench"
    loaded = {}

    def load_and_snapshot(name):
        model, tokenizer = bench_run_load_model(name)
        loaded.update({n: p.detach().clone() for n, p in model.named_parameters()}, model=model)
        return model, tokenizer

    monkeypatch.setattr(bench_run, "load_model", load_and_snapshot)

    payload = run_bench(str(model_dir), str(pairs_file), out, repeats=1, batch_size=4, naive_pairs=2, sections=BENCHED)

    saved = json.loads((out / "bench.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert set(saved) == set(REPORTED) | RUN_KEYS | NOT_TIMED
    assert set(saved["details"]) == set(REPORTED) | NOT_TIMED
    assert list(saved["section_seconds"]) == list(BENCHED) and min(saved["section_seconds"].values()) >= 0
    assert (saved["model"], saved["pairs"], saved["repeats"], saved["batch_size"], saved["naive_pairs"]) == (
        str(model_dir),
        str(pairs_file),
        1,
        4,
        2,
    )
    for name in REPORTED:
        detail = saved["details"][name]
        assert_ratio_of_reported_timings(name, saved[name], detail["measured"])
        assert detail["met"] == _target_met(detail["target"], saved[name]), name
    assert saved["details"]["monitor_overhead_small_step"]["met"] is None  # the scaling line carries no target
    # The whole-set logit lens is timed once: the causal section divides by the time the lens section measured.
    whole_lens = re.search(r"lens ([\d.]+)s / forward", saved["details"]["lens_vs_forward_ratio"]["measured"])
    logit = re.search(r"logit-lens trajectories ([\d.]+)s", saved["details"]["causal_vs_lens_ratio"]["measured"])
    assert whole_lens.group(1) == logit.group(1)
    assert "2 pairs: naive" in saved["details"]["lens_vs_naive_speedup"]["measured"]  # naive on --naive-pairs only
    sft = saved["details"]["monitor_overhead"]["measured"]
    assert "batch 2×16" in sft and "3 probes took" in sft  # steps 0, 2 and 4 of the 4-step fit
    share = saved["details"]["monitor_probe_share"]
    assert "batch 2×16" in share["measured"] and share["target"] == "<= 0.05"  # the headline: the SFT-sized step
    assert saved["details"]["monitor_overhead"]["met"] is None  # two fits' wall ratio: secondary, no target
    assert "batch 1×8" in saved["details"]["monitor_overhead_small_step"]["measured"]
    assert sorted(p.name for p in model_dir.iterdir()) == before  # nothing left in the working directory
    model = loaded.pop("model")
    assert {n: p for n, p in model.named_parameters()}.keys() == loaded.keys()  # no LoRA injected into it
    assert all(p.equal(loaded[n]) for n, p in model.named_parameters())  # the hinge and monitor arms trained copies


def _slow(fn, seconds: float):
    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slowed


class _SlowCausalLens(bench_causal.CausalLens):
    def margins(self, *args, **kwargs):
        time.sleep(SLOW_S)
        return super().margins(*args, **kwargs)


class _SlowHinge(bench_hinge.WrongMarginHinge):
    def __call__(self, *args, **kwargs):
        time.sleep(SLOW_S)
        return super().__call__(*args, **kwargs)


SLOW_S = 0.25
#: section -> (its function, the ratio that measures the fast path, how to slow that path, does slowing raise it?)
SLOWED = {
    "lens": (bench_lens.lens_section, "lens_vs_naive_speedup", ("trajectories", None), False),
    "causal": (bench_causal.causal_section, "causal_vs_naive_speedup", ("CausalLens", _SlowCausalLens), False),
    "hinge": (bench_hinge.hinge_overhead_section, "hinge_overhead", ("WrongMarginHinge", _SlowHinge), True),
}


@pytest.mark.parametrize("section", list(SLOWED))
def test_a_slowed_fast_path_worsens_its_ratio(
    section, llama_tiny, tiny_tokenizer, tiny_pairs, scaled_clock, monkeypatch
):
    run, name, (attribute, replacement), rises = SLOWED[section]
    ctx = BenchContext(llama_tiny, tiny_tokenizer, tiny_pairs, 4, 1, naive_pairs=2)
    module = {"lens": bench_core, "causal": bench_causal, "hinge": bench_hinge}[section]  # where each fast path lives

    def measured() -> tuple[float, str]:
        (ratio,) = [r for r in run(ctx) if r.name == name]
        assert_ratio_of_reported_timings(name, ratio.value, ratio.detail)
        return ratio.value, ratio.detail

    normal, _ = measured()
    monkeypatch.setattr(module, attribute, replacement or _slow(getattr(module, attribute), SLOW_S))
    slowed, detail = measured()
    fast_time = _timings(name, detail)[0 if rises else 1]
    assert fast_time >= SLOW_S * CLOCK_SCALE, f"the slowed path's reported time {fast_time} lacks the sleep"
    assert (slowed > normal) if rises else (slowed < normal), (normal, slowed)


def test_probe_share_is_probe_time_over_the_rest_of_the_fit():
    run = bench_monitor.OverheadRun((8, 256), bare_s=100.0, monitored_s=106.0, probe_s=6.0, probes=3)
    assert run.overhead == pytest.approx(0.06) and run.probe_share == pytest.approx(0.06)


FAKE_PROBE_S = 0.05


def test_probe_share_accounts_a_fake_probe_of_known_cost(
    llama_tiny, tiny_tokenizer, tiny_pairs, small_monitor_runs, tmp_path, monkeypatch
):
    """A probe made dearer by a sleep of known length: the run counts each probe once, adds at least the sleeps to
    the probe time, and the headline ratio is the recorded probe time over the recorded rest of the fit."""
    from dipreg.callbacks.dip_monitor import DipMonitor

    calls, real_probe = [], DipMonitor._probe

    def fake_probe(self, trainer, pl_module):
        calls.append(trainer.global_step)
        time.sleep(FAKE_PROBE_S)
        real_probe(self, trainer, pl_module)

    monkeypatch.setattr(DipMonitor, "_probe", fake_probe)
    monkeypatch.chdir(tmp_path)
    ctx = BenchContext(llama_tiny, tiny_tokenizer, tiny_pairs, 4, 1, naive_pairs=2)
    run = bench_monitor.measure_overhead(ctx, (1, 8), tiny_pairs, ("logit",))
    assert calls == [0, 2, 4] and run.probes == 3  # steps 0, 2 and 4 of the 4-step fit, each timed once
    assert run.probe_s >= 3 * FAKE_PROBE_S  # a sleep lasts at least its length: the probe time includes them
    assert run.rest_s == run.monitored_s - run.probe_s
    assert run.probe_share == run.probe_s / run.rest_s
    monkeypatch.setattr(bench_monitor, "measure_overhead", lambda *args: run)
    headline = bench_monitor.monitor_section(ctx)[0]
    assert headline.name == "monitor_probe_share" and headline.value == run.probe_share
    assert headline.met == (run.probe_share <= bench_monitor.TARGET)
    assert_ratio_of_reported_timings(headline.name, headline.value, headline.detail)


def test_unknown_bench_section_is_named(tmp_path, capsys):
    assert main(["bench", "--only", "lens,warp", "--out", str(tmp_path)]) == 2
    assert "warp" in capsys.readouterr().err
