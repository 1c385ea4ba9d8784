"""DipMonitor and CompressionRetention under two-process DDP and FSDP2 (Lightning ``ModelParallelStrategy``) on
CPU/gloo: every rank runs the same forwards, measures its own shard, and the numbers equal a one-process run.

Lightning's ``FSDPStrategy`` (FSDP1) refuses a CPU accelerator and DeepSpeed is not installed, so FSDP2 is the
sharded strategy these tests can run; see README "Sharded training".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sharded_run

from dipreg.callbacks import DipProbe


def _ranks(out: Path, count: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(count)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The reference: the same fit in one process (4 sequences a step instead of 2 per rank)."""
    out = tmp_path_factory.mktemp("one")
    sharded_run.run(out, "auto", 1)
    return _ranks(out, 1)[0]


def test_shard_pads_every_rank_to_the_same_count():
    probe = DipProbe(sharded_run.PAIRS, ("logit",))
    shards = [probe.shard(rank, 3) for rank in range(3)]
    assert [[p.id for p in pairs] for pairs, _ in shards] == [
        ["p0", "p3", "p6"],
        ["p1", "p4", "p1#padding-0"],
        ["p2", "p5", "p2#padding-0"],
    ]
    assert [n for _, n in shards] == [3, 2, 2]
    assert shards[1][0][2].ctx_a == sharded_run.PAIRS[1].ctx_a  # a padding row is a copy of a pair of the shard
    lone, n = DipProbe(sharded_run.PAIRS[:1], ("logit",)).shard(1, 2)  # more ranks than pairs: one padding row
    assert [p.id for p in lone] == ["p0#padding-0"] and n == 0


def test_one_process_reference_trains_visibly(one_process):
    """lr > 0 changes what the monitor reads, so the equality below covers weights that moved."""
    first, last = one_process["history"][0], one_process["history"][-1]
    assert first["step"] == 0.0 and last["step"] == 2.0
    assert max(abs(first[k] - last[k]) for k in first if k.endswith("max_wrong_dip")) > 1e-3


@pytest.mark.parametrize("strategy", sharded_run.STRATEGIES)
def test_two_ranks_run_equal_forwards_on_their_own_shards_and_match_one_process(strategy, one_process, two_ranks):
    ranks = _ranks(two_ranks / strategy, 2)
    # 7 pairs on 2 ranks: 4 and 3 of their own, rank 1 padded to 4; each probe (steps 0, 1, 2, ...) alike.
    probes = len(ranks[0]["probes"])
    assert probes >= 3 and probes == len(one_process["history"])
    assert [p["ids"] for p in ranks[0]["probes"]] == [["p0", "p2", "p4", "p6"]] * probes
    assert [p["ids"] for p in ranks[1]["probes"]] == [["p1", "p3", "p5"]] * probes
    # The FSDP precondition: the same backbone forwards, with the same rows, on every rank.
    assert [p["rows"] for p in ranks[0]["probes"]] == [p["rows"] for p in ranks[1]["probes"]]
    assert all(p["rows"] for p in ranks[0]["probes"])
    for rank in ranks:
        assert rank["history"] == ranks[0]["history"]
        # every rank holds the last probe's scalars in trainer.callback_metrics (EarlyStopping decides alike)
        assert rank["published"] == {k: v for k, v in ranks[0]["history"][-1].items() if k != "step"}
    # a DipTracker given no rank found it in torch.distributed: each rank measured its own shard of the final
    # weights and got the monitor's last numbers
    assert [rank["tracker"]["ids"] for rank in ranks] == [["p0", "p2", "p4", "p6"], ["p1", "p3", "p5"]]
    for rank in ranks:
        assert rank["tracker"]["scalars"] == pytest.approx(rank["published"], abs=1e-6, nan_ok=True)
        assert rank["shard_restored"] is True
        assert rank["retention"] == pytest.approx(one_process["retention"], abs=1e-6, nan_ok=True)
    single, double = one_process["history"], ranks[0]["history"]
    assert [h["step"] for h in double] == [h["step"] for h in single]
    for a, b in zip(single, double, strict=True):
        assert a.keys() == b.keys()
        assert b == pytest.approx(a, abs=1e-5, nan_ok=True)
