"""dipreg.eval.degrade: every operator restores the model bit-exactly, copies only what it changes, and does what
its name says (RTN vs an independent reference, NF4 table vs bitsandbytes, SVD rank, pruning, block dropping,
deprivation); bad input gets clear errors."""

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, make_tiny_model, operator_param, requires_extra
from peft import LoraConfig, get_peft_model

from dipreg.adapter import ModelAdapter
from dipreg.eval import DegradeError, UnsupportedOperatorError, degrade, parse_ops, state_checksum
from dipreg.eval.degradation.operators import OPERATORS, range_layers, span_layers
from dipreg.eval.degradation.quantize import nf4, nf4_code, rtn

# Every operator, with parameters that fit the tiny model (width 32, intermediate 64, 8 blocks).
ALL_OPS = [
    ("rtn", {"bits": 8}),
    ("rtn", {"bits": 4}),
    ("rtn", {"bits": 3}),
    ("rtn", {"bits": 4, "group_size": 16}),
    ("nf4", {}),
    ("int8", {}),
    ("late_svd", {"rank": 4}),
    ("mid_svd", {"rank": 4}),
    ("late_drop", {}),
    ("mid_drop", {}),
    ("mid_prune", {}),
    ("deprive", {"alpha": 0.0}),
    ("deprive", {"alpha": 0.5}),
]


IDS = [f"{op}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for op, p in ALL_OPS]
WEIGHT_OPS = {"rtn", "nf4", "int8", "late_svd", "mid_svd"}


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(2, 60, (2, 9))


def snapshot(model):
    """Every parameter and buffer: the object, a private clone of its value, and its storage address."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: (t, t.detach().clone(), t.data_ptr()) for name, t in named}


def assert_identical(model, before):
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == before.keys()
    for name, (obj, value, _ptr) in before.items():
        assert after[name] is obj, f"{name} is a different object after restore"
        assert torch.equal(after[name], value), f"{name} changed"


@pytest.mark.parametrize(("op", "params"), [operator_param(op, params) for op, params in ALL_OPS], ids=IDS)
def test_operator_changes_the_output_and_restores_every_parameter_and_buffer(model, ids, op, params):
    before, checksum = snapshot(model), state_checksum(model)
    with torch.no_grad():
        intact = model(input_ids=ids).logits
        with degrade(model, op, **params):
            degraded = model(input_ids=ids).logits
        restored = model(input_ids=ids).logits
    assert not torch.equal(intact, degraded), f"{op} did not change the model's output"
    assert_identical(model, before)
    assert state_checksum(model) == checksum
    assert torch.equal(restored, intact)


@pytest.mark.parametrize(("op", "params"), [operator_param(op, params) for op, params in ALL_OPS], ids=IDS)
def test_operator_restores_the_model_when_the_body_raises(model, ids, op, params):
    before, checksum = snapshot(model), state_checksum(model)
    with pytest.raises(RuntimeError, match="boom"), degrade(model, op, **params):
        model(input_ids=ids)
        raise RuntimeError("boom")
    assert_identical(model, before)
    assert state_checksum(model) == checksum


@pytest.mark.parametrize(("op", "params"), [operator_param(op, params) for op, params in ALL_OPS], ids=IDS)
def test_copied_bytes_equal_the_changed_weights_and_no_other_storage_is_copied(model, op, params):
    before = snapshot(model)
    with degrade(model, op, **params) as report:
        now = dict([*model.named_parameters(), *model.named_buffers()])
        changed = {
            name
            for name, (_obj, value, _ptr) in before.items()
            if name not in now or now[name].shape != value.shape or not torch.equal(now[name], value)
        }
        untouched = [name for name in now if name not in changed]
        # Parameters the operator did not change keep their storage: nothing was copied for them.
        assert all(now[name].data_ptr() == before[name][2] for name in untouched)
        changed_bytes = sum(before[name][1].nbytes for name in changed)
        new_bytes = sum(now[name].nbytes for name in changed)
        if op in WEIGHT_OPS:
            assert changed, op
            # Overwritten in place: the same storage, and exactly the changed weights were copied aside.
            assert all(now[name].data_ptr() == before[name][2] for name in changed)
            assert report.backup_bytes == changed_bytes and report.new_bytes == 0
        elif op == "mid_prune":
            # Replacement modules: originals kept by reference (no copy), new weights half the MLP width.
            assert report.backup_bytes == 0 and report.new_bytes == new_bytes == changed_bytes // 2
        else:
            assert not changed and report.backup_bytes == report.new_bytes == 0
    assert_identical(model, before)


def test_quantizers_leave_embeddings_norms_and_lm_head_alone(model):
    adapter = ModelAdapter(model)
    untouched = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with degrade(model, "rtn", bits=3):
        for name, p in model.named_parameters():
            if name in untouched or "layernorm" in name:
                assert torch.equal(p, before[name]), name
        q = adapter.layers[0].self_attn.q_proj.weight
        assert torch.equal(q, rtn(before["model.layers.0.self_attn.q_proj.weight"], 3))


def reference_rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Row by row, group by group, in float32 numpy: scale = absmax/qmax, round half to even, clip."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    out = np.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            g = w[r, c : c + group]
            scale = np.float32(np.abs(g).max()) / qmax
            out[r, c : c + group] = np.clip(np.rint(g / scale), -qmax, qmax) * scale
    return out


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group_size", [None, 16])
def test_rtn_equals_an_independent_reference_on_random_weights(bits, group_size):
    torch.manual_seed(bits)
    w = torch.randn(24, 40) * torch.rand(24, 1)  # 40 = 2·16 + 8: a ragged last group
    expected = reference_rtn(w.numpy(), bits, group_size or 40)
    got = rtn(w, bits, group_size)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-7)
    levels = 2 * (2 ** (bits - 1) - 1) + 1
    group = group_size or 40
    assert all(len(torch.unique(row[c : c + group])) <= levels for row in got for c in range(0, 40, group))


# NF4 levels published in bitsandbytes/functional.py (get_4bit_type("nf4"), bitsandbytes-foundation/bitsandbytes).
BITSANDBYTES_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


@requires_extra("bitsandbytes", "quant")
def test_nf4_code_table_equals_bitsandbytes_constants():
    torch.testing.assert_close(nf4_code(), torch.tensor(BITSANDBYTES_NF4), rtol=0, atol=1e-7)


@requires_extra("bitsandbytes", "quant")
def test_nf4_snaps_each_block_of_64_to_the_nearest_scaled_level():
    torch.manual_seed(0)
    w = torch.randn(10, 40)  # 400 values: six full blocks and a ragged one
    got = nf4(w).reshape(-1)
    flat = w.reshape(-1)
    code = torch.tensor(BITSANDBYTES_NF4)
    for start in range(0, 400, 64):
        block = flat[start : start + 64]
        absmax = block.abs().max()
        nearest = code[(block[:, None] / absmax - code).abs().argmin(1)] * absmax
        torch.testing.assert_close(got[start : start + 64], nearest, rtol=0, atol=1e-6)


def test_pruning_shrinks_the_intermediate_size_keeps_the_strongest_channels_and_runs(model, ids):
    adapter = ModelAdapter(model)
    originals = {i: adapter.layers[i].mlp.down_proj for i in range(8)}
    mlp = adapter.layers[3].mlp
    importance = (
        mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0)
    )
    strongest = torch.topk(importance, 32).indices.sort().values
    gate = mlp.gate_proj.weight.detach().clone()
    with degrade(model, "mid_prune") as report:
        assert report.layers == [3, 4] and report.details["intermediate_size"] == [32, 32]
        for i in range(8):
            shapes = [tuple(getattr(adapter.layers[i].mlp, n).weight.shape) for n in ("gate_proj", "down_proj")]
            assert shapes == ([(32, 32), (32, 32)] if i in (3, 4) else [(64, 32), (32, 64)])
        assert torch.equal(adapter.layers[3].mlp.gate_proj.weight, gate[strongest])
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert all(adapter.layers[i].mlp.down_proj is originals[i] for i in range(8))


def capture_block(layer):
    seen = {}

    def hook(_m, args, kwargs, output):
        seen["in"] = args[0] if args else kwargs["hidden_states"]
        seen["out"] = output if isinstance(output, torch.Tensor) else output[0]

    return seen, layer.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_a_dropped_block_is_the_identity(arch, ids):
    tiny = make_tiny_model(arch)
    adapter = ModelAdapter(tiny)
    with degrade(tiny, "late_drop") as report:
        assert report.layers == [7]
        seen, handle = capture_block(adapter.layers[7])
        tiny(input_ids=ids)
        handle.remove()
    assert torch.equal(seen["out"], seen["in"])


def test_deprive_scales_the_residual_contribution_and_alpha_one_is_an_exact_noop(model, ids):
    adapter = ModelAdapter(model)
    seen, handle = capture_block(adapter.layers[7])
    with torch.no_grad():
        intact = model(input_ids=ids).logits
        plain = dict(seen)
        with degrade(model, "deprive", alpha=1.0):
            assert torch.equal(model(input_ids=ids).logits, intact)
        handle.remove()
        with degrade(model, "deprive", alpha=0.25):
            seen, handle = capture_block(adapter.layers[7])
            model(input_ids=ids)
            handle.remove()
    torch.testing.assert_close(seen["out"], plain["in"] + 0.25 * (plain["out"] - plain["in"]))


def test_layer_selection_on_a_30_layer_model():
    assert span_layers(30, 0.125, 1.0) == [26, 27, 28, 29]  # late_drop: 3.75 -> 4 blocks
    assert span_layers(30, 0.125, 0.5625) == [13, 14, 15, 16]  # mid_drop
    assert span_layers(30, 0.15, 1.0) == [25, 26, 27, 28, 29]  # deprive: 4.5 -> 5 blocks
    assert range_layers(30, 0.75, 1.0) == list(range(22, 30))  # late_svd: ℓ = 23..30
    assert range_layers(30, 0.375, 0.625) == list(range(11, 18))  # mid_svd / mid_prune: ℓ = 12..18


def test_peft_wrapped_model_is_degraded_through_base_layers_and_restored(ids):
    peft_model = get_peft_model(
        make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "gate_proj"], init_lora_weights=False)
    )
    before, checksum = snapshot(peft_model), state_checksum(peft_model)
    with degrade(peft_model, "late_svd", rank=2), degrade(peft_model, "rtn", bits=3):
        now = dict(peft_model.named_parameters())
        changed = {n for n, (_o, v, _p) in before.items() if n in now and not torch.equal(now[n], v)}
        assert any("layers.7.mlp.gate_proj.base_layer" in n for n in changed)
        assert not any("lora_" in n for n in changed)
        peft_model(input_ids=ids)
    assert_identical(peft_model, before)
    assert state_checksum(peft_model) == checksum
    wrapped_error = pytest.raises(UnsupportedOperatorError, match=r"mid_prune.*PEFT-wrapped")
    with wrapped_error, degrade(peft_model, "mid_prune"):
        pass
    assert_identical(peft_model, before)


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("late_sdv", {}, "Unknown degradation operator 'late_sdv'; known operators: rtn"),
        ("late_svd", {"rank": 1000}, r"rank=1000 exceeds the \(64, 32\) matrix of block 6 mlp.gate_proj"),
        ("late_drop", {"fraction": 0.0}, r"late_drop: fraction must be a fraction of depth in \(0, 1\], got 0.0"),
        ("deprive", {"fraction": 1.5}, r"deprive: fraction must be a fraction of depth in \(0, 1\], got 1.5"),
        ("mid_svd", {"end": 1.2}, r"mid_svd: end must be a fraction of depth in \(0, 1\], got 1.2"),
        ("rtn", {"bits": 5}, r"bits=5 is not supported; use one of \(8, 4, 3\)"),
        ("rtn", {"rank": 4}, r"no parameter\(s\) \['rank'\]; its parameters: bits, group_size"),
        ("deprive", {"alpha": 2.0}, r"deprive: alpha must be a residual scale \(1 = intact\) in \[0, 1\], got 2.0"),
        ("mid_prune", {"fraction": 1.0}, "would remove all 64 channels"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error_and_the_model_untouched(model, op, params, message):
    checksum = state_checksum(model)
    with pytest.raises(DegradeError, match=message), degrade(model, op, **params):
        pass
    assert state_checksum(model) == checksum


def test_weight_operators_name_operator_and_architecture_on_gpt2():
    gpt2 = make_tiny_model("gpt2")
    with pytest.raises(UnsupportedOperatorError, match=r"'late_svd'.*'gpt2'"), degrade(gpt2, "late_svd", rank=2):
        pass
    with pytest.raises(UnsupportedOperatorError, match=r"'rtn'.*'gpt2'"), degrade(gpt2, "rtn", bits=4):
        pass


def test_parse_ops_reads_the_cli_spec():
    spec = "late_svd:rank=64,mid_svd:rank=64,rtn:bits=3,late_drop,mid_prune,deprive:alpha=0,rtn:bits=4,group_size=128"
    assert parse_ops(spec) == [
        ("late_svd", {"rank": 64}),
        ("mid_svd", {"rank": 64}),
        ("rtn", {"bits": 3}),
        ("late_drop", {}),
        ("mid_prune", {}),
        ("deprive", {"alpha": 0}),
        ("rtn", {"bits": 4, "group_size": 128}),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rank=3,late_svd", "comes before any operator"),
        ("late_svd:rank=abc", "'abc' is not a number"),
        ("nope:x=1", "Unknown degradation operator 'nope'"),
        ("rtn:bits=2", "bits=2 is not supported"),
        (" , ", "--ops is empty"),
    ],
)
def test_parse_ops_rejects_bad_specs(spec, message):
    with pytest.raises(DegradeError, match=message):
        parse_ops(spec)


#: Small parameters for every registered operator on the tiny models (rank 2 fits their 32-wide matrices).
CALIBRATION = {"group_size": 16, "samples": 4, "seq_len": 16}
TINY_PARAMS = {
    "late_svd": {"rank": 2},
    "mid_svd": {"rank": 2},
    "rtn": {"bits": 3},
    "hqq": {"group_size": 16},
    "gptq": CALIBRATION,
    "awq": CALIBRATION,
}
#: Operators that rewrite weight matrices: they need nn.Linear blocks (GPT-2's Conv1D is refused by name).
WEIGHT_OPERATORS = {"rtn", "nf4", "int8", "hqq", "gptq", "awq", "late_svd", "mid_svd", "mid_prune"}


@pytest.mark.parametrize("op", [operator_param(op) for op in OPERATORS])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_operator_degrades_and_restores_every_architecture_it_claims(
    arch, op, ids, tiny_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("DIPREG_CACHE", str(tmp_path))  # calibrations of this test only
    tiny = make_tiny_model(arch)
    before, checksum = snapshot(tiny), state_checksum(tiny)
    with torch.no_grad():
        intact = tiny(input_ids=ids).logits
        if arch == "gpt2" and op in WEIGHT_OPERATORS:
            with (
                pytest.raises(UnsupportedOperatorError, match="gpt2"),
                degrade(tiny, op, tokenizer=tiny_tokenizer, **TINY_PARAMS.get(op, {})),
            ):
                pass
        elif arch == "gpt_neox" and op == "awq":  # llmcompressor has no AWQ mappings for GPT-NeoX
            with (
                pytest.raises(UnsupportedOperatorError, match="no AWQ smoothing mappings for GPTNeoXForCausalLM"),
                degrade(tiny, op, tokenizer=tiny_tokenizer, **TINY_PARAMS[op]),
            ):
                pass
        else:
            with degrade(tiny, op, tokenizer=tiny_tokenizer, **TINY_PARAMS.get(op, {})):
                assert not torch.equal(tiny(input_ids=ids).logits, intact), (arch, op)
    assert_identical(tiny, before)
    assert state_checksum(tiny) == checksum


@pytest.mark.parametrize(("op", "rank"), [("late_svd", 3), ("mid_svd", 5)])
def test_svd_keeps_the_best_rank_r_approximation(op, rank, model):
    """Eckart–Young: the best rank-r approximation's squared Frobenius error is the sum of the squared singular
    values it drops. Any other rank-r matrix (the wrong singular values kept, a rounded factor) errs more."""
    adapter = ModelAdapter(model)
    layers = range_layers(8, *{"late_svd": (0.75, 1.0), "mid_svd": (0.375, 0.625)}[op])
    names = ("gate_proj", "up_proj", "down_proj")
    originals = {(i, n): getattr(adapter.layers[i].mlp, n).weight.detach().clone() for i in range(8) for n in names}
    with degrade(model, op, rank=rank) as report:
        assert report.layers == layers
        for (i, name), original in originals.items():
            got = getattr(adapter.layers[i].mlp, name).weight.detach()
            if i not in layers:
                assert torch.equal(got, original), (i, name)
                continue
            singular = np.linalg.svd(original.double().numpy(), compute_uv=False)  # independent of torch's SVD
            tail = float((singular[rank:] ** 2).sum())
            error = float(((original.double() - got.double()) ** 2).sum())
            assert error == pytest.approx(tail, rel=1e-4), (i, name)
            assert int(np.linalg.matrix_rank(got.double().numpy(), tol=1e-4 * singular[0])) == rank


def test_check_restored_names_what_changed_the_model(llama_tiny):
    from dipreg.eval.degradation.ledger import check_restored

    checksum = state_checksum(llama_tiny)
    check_restored(llama_tiny, checksum, "nothing")  # unchanged: no error
    with torch.no_grad():
        next(llama_tiny.parameters()).view(-1)[0] += 1.0
    with pytest.raises(RuntimeError, match="late_svd:rank=2 did not restore"):
        check_restored(llama_tiny, checksum, "late_svd:rank=2")


def test_verify_passes_on_a_real_restore_and_names_the_operator_when_the_restore_breaks(model, monkeypatch):
    before = state_checksum(model)
    with degrade(model, "rtn", verify=True, bits=3):
        assert state_checksum(model) != before
    assert state_checksum(model) == before
    from dipreg.eval.degradation.ledger import Ledger

    monkeypatch.setattr(Ledger, "restore", lambda self: None)  # a planted fault: nothing is written back
    with pytest.raises(RuntimeError, match="rtn:bits=3 did not restore"), degrade(model, "rtn", verify=True, bits=3):
        pass
    monkeypatch.undo()
    with torch.no_grad():  # put the weights back by hand so the module-scoped model stays intact for other tests
        fresh = make_tiny_model("llama")
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
            p.copy_(q)
    assert state_checksum(model) == before


# -- the restore check of every exit, and contexts exited out of order --------------------------------------


def test_every_exit_checks_the_restore_of_the_touched_weights_only(monkeypatch):
    from dipreg.eval.degradation import ledger as ledger_module

    tiny = make_tiny_model("llama")
    hashed = []
    real = ledger_module.tensor_digest
    monkeypatch.setattr(ledger_module, "tensor_digest", lambda t: hashed.append(t.shape) or real(t))
    with degrade(tiny, "late_svd", rank=2) as report:
        pass
    matrices = report.details["matrices"]
    assert len(hashed) == 2 * matrices  # each touched weight hashed at backup and after restore; nothing else
    hashed.clear()
    with degrade(tiny, "late_drop"):
        pass
    assert hashed == []  # hooks only: nothing to hash


def test_a_broken_restore_is_named_without_verify(monkeypatch):
    from dipreg.eval.degradation.ledger import Ledger
    from dipreg.eval.degradation.operators import RestoreError

    tiny = make_tiny_model("llama")
    monkeypatch.setattr(Ledger, "restore", lambda self: None)  # a planted fault: nothing is written back
    broken = pytest.raises(RestoreError, match=r"late_svd:rank=2 did not restore the model: model\.layers\.6\.mlp\.\w+")
    with broken, degrade(tiny, "late_svd", rank=2):
        pass


def test_a_body_that_moves_a_touched_weight_to_another_dtype_is_caught():
    from dipreg.eval.degradation.operators import RestoreError

    tiny = make_tiny_model("llama")
    caught = pytest.raises(RestoreError, match=r"rtn:bits=3 did not restore the model: .* differs from its original")
    with caught, degrade(tiny, "rtn", bits=3):
        tiny.half()


def test_a_body_that_swaps_a_touched_parameter_is_caught():
    from dipreg.eval.degradation.operators import RestoreError

    tiny = make_tiny_model("llama")
    caught = pytest.raises(
        RestoreError, match=r"overwritten weight #\d+ \(64, 32\) is no longer a parameter of the model"
    )
    with caught, degrade(tiny, "late_svd", rank=2):
        gate = tiny.model.layers[6].mlp.gate_proj
        gate.weight = torch.nn.Parameter(gate.weight.detach().clone())


def test_verify_still_covers_the_whole_model(monkeypatch):
    tiny = make_tiny_model("llama")
    embed = tiny.model.embed_tokens.weight
    caught = pytest.raises(RuntimeError, match=r"late_svd:rank=2 did not restore the model bit-exactly")
    with caught, degrade(tiny, "late_svd", rank=2, verify=True), torch.no_grad():
        embed[0, 0] += 1.0  # not touched by the operator: only the whole-model checksum sees it
    with degrade(tiny, "late_svd", rank=2), torch.no_grad():  # without verify the cheap check does not look there
        embed[0, 0] -= 1.0


def test_contexts_exited_out_of_order_are_all_restored_and_refused(ids):
    tiny = make_tiny_model("llama")
    before, checksum = snapshot(tiny), state_checksum(tiny)
    first, second = degrade(tiny, "late_svd", rank=2), degrade(tiny, "rtn", bits=3)
    first.__enter__()
    second.__enter__()
    with pytest.raises(DegradeError, match=r"'late_svd:rank=2' was exited while 'rtn:bits=3' \(entered after it\)"):
        first.__exit__(None, None, None)
    assert_identical(tiny, before)  # both undone, newest first
    assert second.__exit__(None, None, None) is False  # already restored: its own exit does nothing more
    assert_identical(tiny, before)
    assert state_checksum(tiny) == checksum
    with degrade(tiny, "rtn", bits=3, verify=True):  # the model's stack is clean again
        pass


def test_out_of_order_exit_through_a_peft_wrapper_and_its_base_is_caught_too():
    peft_model = get_peft_model(make_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(peft_model)
    outer = degrade(peft_model, "deprive", alpha=0.5)
    inner = degrade(peft_model.get_base_model(), "mid_prune")
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(DegradeError, match=r"'deprive:alpha=0\.5' was exited while 'mid_prune'"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    assert_identical(peft_model, before)


def test_an_exception_from_the_body_stays_attached_to_the_out_of_order_error():
    tiny = make_tiny_model("llama")
    first, second = degrade(tiny, "late_drop"), degrade(tiny, "mid_drop")
    first.__enter__()
    second.__enter__()
    boom = ValueError("boom")
    with pytest.raises(DegradeError) as info:
        first.__exit__(ValueError, boom, None)
    assert info.value.__context__ is boom
    second.__exit__(None, None, None)
