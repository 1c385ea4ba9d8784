"""`dipreg bench --peers`: each peer's lens against references computed here from the model itself, the skip notices,
the memory worker, and the bench.json keys with ratios that are the ratios of the numbers they report.

The peers (TransformerLens, nnsight, nnterp) are optional: a test that needs one is skipped when it is absent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import requires_extra

from dipreg.adapter import ModelAdapter
from dipreg.bench import peers as bench_peers
from dipreg.bench import peers_tools
from dipreg.bench.core import BenchContext
from dipreg.bench.peers_tools import TOOLS, PeerInputs, peer_inputs
from dipreg.bench.run import OPT_IN, PEERS_PAIRS, SECTIONS, run_bench, section_names
from dipreg.lenses.causal import naive_causal_margins, neutral_token_ids
from dipreg.stimuli import save_pairs

PEERS = ("transformer_lens", "nnsight", "nnterp")


def peer_marks(*tools: str) -> list[pytest.MarkDecorator]:
    """:func:`requires_extra` marks for every package of ``tools`` (all from the ``peers`` extra)."""
    return [requires_extra(package, "peers") for tool in tools for package in TOOLS[tool].packages]


def needs(*tools: str) -> Callable[[Callable], Callable]:
    """Decorator: skip the test when a package of ``tools`` is not installed (the suite's one skip policy)."""

    def mark(test: Callable) -> Callable:
        for each in peer_marks(*tools):
            test = each(test)
        return test

    return mark


def tools_param(*tools: str) -> list[Any]:
    """``tools`` as parameters, each skipped when its packages are not installed."""
    return [pytest.param(tool, marks=peer_marks(tool)) for tool in tools]


@torch.no_grad()
def reference_logit_margins(model, inputs: PeerInputs) -> torch.Tensor:
    """``(2N, L)``: every context alone through the HF model; layer ℓ < L through the final norm and the full head,
    layer L from the model's own output logits."""
    adapter = ModelAdapter(model)
    out = torch.empty(inputs.num_contexts, adapter.num_layers)
    for i, ids in enumerate(inputs.encoded):
        result = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        # hidden_states[ℓ] is the raw output of block ℓ for ℓ < L; the last entry is already normed, so use logits.
        rows = [model.lm_head(adapter.final_norm(h[0, -1])) for h in result.hidden_states[1:-1]]
        logits = torch.stack([*rows, result.logits[0, -1]])
        out[i] = logits[:, inputs.pos_ids[i]] - logits[:, inputs.neg_ids[i]]
    return out


@torch.no_grad()
def reference_causal_margins(model, tokenizer, inputs: PeerInputs) -> torch.Tensor:
    """``(2N, L)`` from the repository's naive transplant (a full forward of the neutral prompt per item and layer),
    with the source residuals read from every context run alone."""
    adapter = ModelAdapter(model)
    residuals = torch.stack(
        [
            adapter.residuals(
                torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([len(ids) - 1])
            )[:, 0]
            for ids in inputs.encoded
        ],
        dim=1,
    )
    neutral = neutral_token_ids(tokenizer, inputs.neutral_prompt)
    return naive_causal_margins(adapter, neutral, residuals, inputs.pos_ids, inputs.neg_ids).T


@pytest.fixture
def inputs(tiny_tokenizer, tiny_pairs) -> PeerInputs:
    return peer_inputs(tiny_tokenizer, tiny_pairs, batch_size=3)


def test_peer_inputs_are_dipregs_tokens_left_padded(inputs, tiny_tokenizer, tiny_pairs):
    texts = [c for p in tiny_pairs for c in (p.ctx_a, p.ctx_b)]
    assert [tiny_tokenizer(t)["input_ids"] for t in texts] == inputs.encoded
    seen = []
    for batch in inputs.batches:
        assert bool(batch.attention_mask[:, -1].all()), "the last position must be a real token in every row"
        for row, i in enumerate(batch.rows.tolist()):
            real = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            assert real == inputs.encoded[i] and batch.texts[row] == texts[i]
            seen.append(i)
    assert sorted(seen) == list(range(2 * len(tiny_pairs)))


@pytest.mark.parametrize("tool", tools_param("dipreg", *PEERS))
def test_logit_lens_of_every_tool_equals_the_full_vocabulary_reference(tool, llama_tiny, tiny_tokenizer, inputs):
    reference = reference_logit_margins(llama_tiny, inputs)
    assert reference.abs().max() > 1e-2, "margins too close to zero for the comparison to mean anything"
    margins = TOOLS[tool].build(llama_tiny, tiny_tokenizer, inputs).margins("logit")
    # nnterp returns probabilities: log p(pos) − log p(neg) carries float32 rounding of the softmax.
    torch.testing.assert_close(margins, reference, atol=1e-4 if tool == "nnterp" else 2e-5, rtol=0)


@pytest.mark.parametrize("tool", tools_param("dipreg", "nnterp"))
def test_causal_lens_equals_the_naive_transplant(tool, llama_tiny, tiny_tokenizer, inputs):
    reference = reference_causal_margins(llama_tiny, tiny_tokenizer, inputs)
    assert reference.abs().max() > 1e-2
    margins = TOOLS[tool].build(llama_tiny, tiny_tokenizer, inputs).margins("causal")
    torch.testing.assert_close(margins, reference, atol=1e-4, rtol=0)


@needs("transformer_lens")
def test_transformer_lens_reuses_the_final_norm_scale_only_outside_accumulated_resid(
    llama_tiny, tiny_tokenizer, inputs
):
    """TransformerLens #1076: ``accumulated_resid(apply_ln=True)`` used the final norm's cached scale at every layer.
    4.3 recomputes it there (the test above), but ``apply_ln_to_stack`` still defaults to the cached scale: its
    intermediate layers disagree with the logit lens while its last layer, whose scale it is, agrees."""
    runner = TOOLS["transformer_lens"].build(llama_tiny, tiny_tokenizer, inputs)
    (batch, *_) = inputs.batches
    with torch.no_grad():
        _, cache = runner.bridge.run_with_cache(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            names_filter=lambda name: "hook_resid_" in name or name == "ln_final.hook_scale",
        )
        stack = cache.accumulated_resid(apply_ln=False, pos_slice=-1)[1:]
        cached = runner.bridge.unembed(cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1))
    margins = peers_tools.pick_margins(cached, inputs.pos_ids[batch.rows], inputs.neg_ids[batch.rows]).T
    reference = reference_logit_margins(llama_tiny, inputs)[batch.rows]
    torch.testing.assert_close(margins[:, -1], reference[:, -1], atol=2e-5, rtol=0)
    assert (margins[:, :-1] - reference[:, :-1]).abs().max() > 1e-2


def test_section_is_skipped_with_one_line_when_no_peer_is_installed(
    monkeypatch, llama_tiny, tiny_tokenizer, tiny_pairs, capsys
):
    real = peers_tools.importlib.util.find_spec
    absent = {"transformer_lens", "nnsight", "nnterp"}
    monkeypatch.setattr(
        peers_tools.importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a)
    )
    monkeypatch.setattr(bench_peers, "peer_inputs", lambda *_a, **_k: pytest.fail("the section ran without a peer"))
    ratios = bench_peers.peers_section(BenchContext(llama_tiny, tiny_tokenizer, tiny_pairs, 4, 1))
    lines = capsys.readouterr().out.strip().splitlines()
    assert ratios == []
    assert lines[-1].startswith("bench peers: section skipped")
    assert [line for line in lines if "skipped" in line and "not installed" in line] == [
        f"bench peers: {name} skipped ({', '.join(TOOLS[name].packages)} not installed)" for name in PEERS
    ]


def _fake_memory(ctx, inputs, keys):
    # Distinct made-up numbers per (tool, lens), so that a ratio built from the wrong pair would show.
    return {
        key: {"added_mb": 10.0 + 7 * i, "setup_mb": 1.0, "first_run_mb": 100.0 + 13 * i} for i, key in enumerate(keys)
    }


@needs("nnsight")
def test_a_peer_that_cannot_be_imported_is_skipped_and_the_others_run(
    monkeypatch, llama_tiny, tiny_tokenizer, tiny_pairs, capsys
):
    broken = peers_tools.PeerTool("transformer_lens", (), ("logit",), "dipreg.bench.no_such_module:Runner")
    monkeypatch.setitem(TOOLS, "transformer_lens", broken)
    monkeypatch.setitem(TOOLS, "nnterp", peers_tools.PeerTool("nnterp", ("no_such_package_xyz",), ("logit",), ""))
    monkeypatch.setattr(bench_peers, "measure_memory", _fake_memory)
    ratios = bench_peers.peers_section(BenchContext(llama_tiny, tiny_tokenizer, tiny_pairs, 4, 1), num_pairs=2)
    out = capsys.readouterr().out
    assert "bench peers: nnterp skipped (no_such_package_xyz not installed)" in out
    assert "bench peers: transformer_lens skipped (import failed:" in out
    tools = {r.name.split("_")[1] for r in ratios if r.name.endswith("_seconds")}
    assert tools == {"dipreg", "nnsight"}


@needs(*PEERS)
def test_bench_json_holds_each_ratio_as_the_ratio_of_the_numbers_it_reports(
    monkeypatch, tmp_path, llama_tiny, tiny_tokenizer, tiny_pairs
):
    llama_tiny.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    save_pairs(tiny_pairs[:2], tmp_path / "pairs.jsonl")
    monkeypatch.setattr(bench_peers, "measure_memory", _fake_memory)
    payload = run_bench(
        str(tmp_path / "model"),
        str(tmp_path / "pairs.jsonl"),
        tmp_path / "out",
        repeats=1,
        batch_size=4,
        sections=["peers"],
    )
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["peers_pairs"] == payload["peers_pairs"] == PEERS_PAIRS
    pairs = [("transformer_lens", "logit"), ("nnsight", "logit"), ("nnterp", "logit"), ("nnterp", "causal")]
    for tool, lens in pairs:
        stem, ref = f"peer_{tool}_{lens}", f"peer_dipreg_{lens}"
        assert saved[f"{stem}_speedup"] == pytest.approx(saved[f"{stem}_seconds"] / saved[f"{ref}_seconds"], rel=1e-12)
        assert saved[f"{stem}_memory_ratio"] == pytest.approx(
            saved[f"{ref}_added_mb"] / saved[f"{stem}_added_mb"], rel=1e-12
        )
        assert saved[f"{stem}_first_run_memory_ratio"] == pytest.approx(
            saved[f"{ref}_first_run_mb"] / saved[f"{stem}_first_run_mb"], rel=1e-12
        )
        assert 0 <= saved[f"{stem}_max_err"] < 1e-3 and 0 <= saved[f"{stem}_dip_mismatch"] <= 1
        assert saved["details"][f"{stem}_speedup"]["target"] == (">= 5" if lens == "logit" else ">= 10")
    assert saved["peer_dipreg_logit_max_err"] <= 1e-4 and saved["details"]["peer_dipreg_logit_max_err"]["met"]
    probe = saved["peer_monitor_probe_nnterp_s"]
    assert probe == pytest.approx(saved["peer_nnterp_logit_seconds"] + saved["peer_nnterp_causal_seconds"], rel=1e-12)
    floor = saved["peer_backbone_forward_s"]
    multiples = saved["details"]["peer_backbone_forward_s"]["measured"]
    for tool in ("dipreg", *PEERS):
        assert f"{tool} {saved[f'peer_{tool}_logit_seconds'] / floor:.2f}×" in multiples


def test_the_floor_runs_the_decoder_stack_on_every_batch_and_nothing_else(llama_tiny, tiny_tokenizer, tiny_pairs):
    """One backbone forward per left-padded batch, every context once, and no head (its forward never runs)."""
    adapter = ModelAdapter(llama_tiny)
    inputs = peer_inputs(tiny_tokenizer, tiny_pairs, 3)
    rows: list[int] = []
    heads: list[int] = []
    adapter.backbone.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    adapter.lm_head.register_forward_pre_hook(lambda *_: heads.append(1))
    bench_peers.backbone_forward(adapter, inputs)
    assert rows == [len(b.rows) for b in inputs.batches] and sum(rows) == 2 * len(tiny_pairs) and heads == []


def test_memory_worker_counts_the_run_not_what_came_before(memory_worker):
    """A build that touches 400 MB and frees it, then runs that hold 64 MB each, the first of which also builds a
    200 MB cache it keeps: the worker reports about 264 for the first run and about 64 for the second.

    Run in a fresh interpreter (``tests/hungry_worker.py``, started at collection), as the bench runs every tool: in
    the test process, pages freed by earlier tests are already resident and would absorb the 64 MB."""
    code, stdout, stderr = memory_worker
    assert code == 0, stderr[-2000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert 56 <= result["added_mb"] <= 100, result  # the second run: the working memory only
    assert 256 <= result["first_run_mb"] <= 300, result  # the first run: the working memory and the kept cache


def test_peers_run_only_when_asked_for():
    assert "peers" in SECTIONS and "peers" in OPT_IN
    assert section_names() == ["lens", "causal", "hinge"]
    assert section_names(peers=True) == ["lens", "causal", "hinge", "peers"]
    assert section_names(["peers"], peers=True) == ["peers"] == section_names(["peers"])


def test_the_probe_constants_are_dipmonitors_defaults():
    import inspect

    from dipreg.callbacks.dip_monitor import DipMonitor

    params = inspect.signature(DipMonitor).parameters
    assert params["pairs"].default == bench_peers.MONITOR_PAIRS
    assert tuple(params["lenses"].default) == bench_peers.MONITOR_LENSES
    assert params["batch_size"].default == bench_peers.MONITOR_BATCH
