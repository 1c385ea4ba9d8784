"""`python -m dipreg.selftest --device cpu` on tiny sizes: the JSON it writes holds parity, timings and versions."""

from __future__ import annotations

import json
import math

import torch

from dipreg.selftest.parity import DEGRADATIONS


def test_cpu_selftest_writes_parity_timings_and_versions(cpu_selftest):
    """The command as a user runs it (``python -m dipreg.selftest``, in a child process started at collection:
    ``cpu_selftest`` in conftest)."""
    code, output, out = cpu_selftest
    report = json.loads((out / "selftest.json").read_text())
    assert code == 0 and report["parity_ok"] is True and report["device"] == "cpu", output[-2000:]
    assert f"wrote {out / 'selftest.json'}; parity ok" in output
    archs = report["parity"]["architectures"]
    assert set(archs) == {"llama", "gpt2"}
    for arch, row in archs.items():
        # the target is the CPU itself: float32 there is the reference computation, bit for bit
        assert all(v in (0.0, None) for v in row["float32"]["max_rel_diff"].values()), arch
        assert row["bfloat16"]["max_rel_diff"]["logit"] > 0  # the bfloat16 model really ran
        assert row["split"]["checksum_as_plain"] is True and row["split"]["restored"] is True
    ops = {name for name, _ in DEGRADATIONS}
    gpt2 = archs["gpt2"]["float32"]["max_rel_diff"]
    assert {op for op in ops if gpt2[op] is None} == {"late_svd", "rtn", "mid_prune"}  # Conv1D: weight ops refused
    assert all(archs["llama"]["float32"]["max_rel_diff"][op] is not None for op in ops)
    (timing,) = report["timing"].values()
    assert timing["settings"]["dtype"] == "bfloat16" and timing["settings"]["probes"] >= 1
    assert all(math.isfinite(v) and v > 0 for v in timing["ratios"].values())
    versions = report["versions"]
    assert versions["found"]["torch"] == torch.__version__ and versions["required"]["torch"].startswith(">=")
