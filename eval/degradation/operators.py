"""The degradation operators and ``degrade``, the context manager that applies one to a live model.

Every operator changes the model only through a :class:`~dipreg.eval.degradation.ledger.Ledger`, so leaving the context
(normally or by an exception) restores the model bit-exactly while copying only the weights that changed.
Layer choices are relative depths; the defaults follow the paper (§5.2–5.5, §6.6) and are listed in README.
This module must not measure anything: readouts live in ``dipreg.trajectories``, statistics in ``stats``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dipreg.adapter import ModelAdapter
from dipreg.devices import execution_device, module_tensor, offload_slot
from dipreg.eval.degradation import quantize
from dipreg.eval.degradation.calibrated import awq_problem, calibrated_state, llmcompressor_problem
from dipreg.eval.degradation.layouts import UnsupportedOperatorError, block_linears, is_peft_wrapped, mlp_modules
from dipreg.eval.degradation.ledger import Ledger, check_restored, state_checksum
from dipreg.eval.degradation.presets import PRESETS, expand_presets
from dipreg.validation import validate_number


class DegradeError(ValueError):
    """Bad operator name or parameters, or ``degrade`` contexts of one model exited out of order."""


class RestoreError(RuntimeError):
    """Leaving a ``degrade`` context did not bring back what the operator changed; the message names the operator."""


@dataclass(eq=False)
class _Active:
    """One entered ``degrade`` context: its label, its undo log, and who restored it if not itself."""

    label: str
    ledger: Ledger
    restored_by: str | None = None


#: The ``degrade`` contexts in force on each model, oldest first, keyed by the unwrapped causal LM (so that a
#: PEFT wrapper and its base model share one stack).
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[_Active]] = weakref.WeakKeyDictionary()


@dataclass
class DegradeReport:
    """What an operator did: the blocks it touched (0-based), the bytes it copied, and operator details."""

    op: str
    params: dict[str, Any]
    layers: list[int]
    backup_bytes: int = 0
    new_bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "op": self.op,
            "params": self.params,
            "layers": self.layers,
            "backup_bytes": self.backup_bytes,
            "new_bytes": self.new_bytes,
            "details": self.details,
        }


# ---------------------------------------------------------------- layer selection


def _count(fraction: float, num_layers: int) -> int:
    """``fraction`` of ``num_layers`` blocks, rounded half up, at least one (0.125 of 30 -> 4)."""
    return max(1, math.floor(fraction * num_layers + 0.5))


def range_layers(num_layers: int, start: float, end: float) -> list[int]:
    """0-based indices of the blocks ``ℓ`` (1-based) with ``start < ℓ/L ≤ end``."""
    return [i for i in range(num_layers) if start + 1e-9 < (i + 1) / num_layers <= end + 1e-9]


def span_layers(num_layers: int, fraction: float, end: float) -> list[int]:
    """The ``_count(fraction)`` consecutive blocks whose last block is ``ℓ = round_half_up(end·L)``."""
    n = _count(fraction, num_layers)
    last = min(num_layers, max(n, math.floor(end * num_layers + 0.5)))
    return list(range(last - n, last))


# ---------------------------------------------------------------- operators


def _weight(linear: nn.Module) -> Tensor:
    """The live weight matrix of ``linear``, also when accelerate offloads it (its parameter is then ``meta``)."""
    return module_tensor(linear, "weight")


def _write_weight(ledger: Ledger, linear: nn.Module, value: Tensor) -> None:
    """Make ``linear`` compute with ``value`` until the ledger restores it: in place for a weight on the module, or,
    when accelerate offloads it, by swapping the entry its hook loads from (the stored original is never touched)."""
    slot = offload_slot(linear, "weight")
    if slot is None:
        ledger.overwrite(linear.weight, value)
        return
    mapping, key = slot
    original = mapping.get(key)
    if original is None:  # stored on disk only: the loader reads it afresh on every access
        original = _weight(linear)
    ledger.swap_entry(mapping, key, value.to(original.device, original.dtype))


def _quantize_blocks(adapter: ModelAdapter, ledger: Ledger, op: str, fn: Callable[[Tensor], Tensor]) -> dict:
    linears = block_linears(adapter, op)
    for _name, linear in linears:
        _write_weight(ledger, linear, fn(_weight(linear)))
    return {"matrices": len(linears)}


def _rtn(adapter: ModelAdapter, ledger: Ledger, *, bits: int, group_size: int | None) -> dict:
    return _quantize_blocks(adapter, ledger, "rtn", lambda w: quantize.rtn(w, bits, group_size))


def _int8(adapter: ModelAdapter, ledger: Ledger) -> dict:
    return _quantize_blocks(adapter, ledger, "int8", quantize.int8)


def _nf4(adapter: ModelAdapter, ledger: Ledger, *, block_size: int) -> dict:
    return _quantize_blocks(adapter, ledger, "nf4", lambda w: quantize.nf4(w, block_size))


def _check_group_size(linears: list[tuple[str, nn.Linear]], group_size: int | None, op: str) -> None:
    """Refuse a group size that does not divide the input width of every matrix (``None``: per channel, always
    fits); libraries differ on what they do then (mix rows, skip the layer), so no matrix is left to them."""
    for name, linear in linears:
        if group_size is not None and linear.in_features % group_size:
            raise DegradeError(
                f"{op}: group_size={group_size} does not divide the {linear.in_features} inputs of {name}; use a "
                "group size that divides the input width of every Linear in the blocks (the default model: 576 "
                "and 1536, e.g. 64 or 32), or group_size=none for one scale per output channel."
            )


def _hqq(adapter: ModelAdapter, ledger: Ledger, *, bits: int, group_size: int | None) -> dict:
    _check_group_size(block_linears(adapter, "hqq"), group_size, "hqq")
    return _quantize_blocks(adapter, ledger, "hqq", lambda w: quantize.hqq(w, bits, group_size))


def _plain_parameters(causal_lm: nn.Module) -> dict[str, Tensor]:
    """The parameters of ``causal_lm`` by their name in a plain model: PEFT's ``base_layer`` dropped, LoRA
    matrices left out (the names :func:`~dipreg.eval.degradation.calibrated.calibrated_state` returns)."""
    out = {}
    for name, param in causal_lm.named_parameters():
        parts = name.split(".")
        if not any(part.startswith("lora_") for part in parts):
            out[".".join(part for part in parts if part != "base_layer")] = param
    return out


def _calibrated(adapter: ModelAdapter, ledger: Ledger, *, op: str, tokenizer: Any, **options: Any) -> dict:
    if tokenizer is None:
        raise DegradeError(
            f"{op} calibrates on text: pass the model's tokenizer, degrade(model, {op!r}, tokenizer=tokenizer)."
        )
    causal_lm = adapter.causal_lm
    _check_group_size(block_linears(adapter, op), options["group_size"], op)
    if any(p.is_meta for p in causal_lm.parameters()):
        raise UnsupportedOperatorError(
            f"{op} calibrates a copy of the whole model, which this one (offloaded with accelerate) cannot give; "
            "load it in one piece (no device_map offload)."
        )
    if op == "awq" and any(is_peft_wrapped(m) for m in causal_lm.modules()):
        raise UnsupportedOperatorError(
            "awq rescales the norms in front of the projections, which the LoRA matrices read too; merge the "
            "adapter first (merge_and_unload(), as dipreg arms does) or use gptq, which quantizes the base weights."
        )
    problem = awq_problem(causal_lm) if op == "awq" else None
    if problem:
        raise UnsupportedOperatorError(problem)
    calibration = calibrated_state(causal_lm, tokenizer, op, **options)
    params = _plain_parameters(causal_lm)
    unknown = sorted(set(calibration.state) - set(params))
    if unknown:
        raise RuntimeError(f"{op}: llmcompressor changed {unknown[0]!r}, which is not a parameter of the model.")
    for name, value in calibration.state.items():
        ledger.overwrite(params[name], value.to(params[name].device, params[name].dtype))
    return {
        "tensors": len(calibration.state),
        "calibration_tokens": options["samples"] * options["seq_len"],
        "calibration_s": calibration.seconds,
        "cached": calibration.cached,
    }


def truncated_svd(weight: Tensor, rank: int) -> Tensor:
    """Best rank-``rank`` approximation of a matrix (``torch.linalg.svd``), in the matrix's dtype."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype)


def _svd(adapter: ModelAdapter, ledger: Ledger, layers: list[int], *, op: str, rank: int) -> dict:
    mlps = [mlp_modules(adapter, i, op) for i in layers]
    for i, mlp in zip(layers, mlps, strict=True):
        for name, linear in zip([*mlp.input_names, mlp.output_name], mlp.base_linears(), strict=True):
            if rank > min(linear.weight.shape):
                raise DegradeError(
                    f"{op}: rank={rank} exceeds the {tuple(linear.weight.shape)} matrix of block {i} mlp.{name}; "
                    f"choose rank <= {min(linear.weight.shape)}."
                )
    for mlp in mlps:
        for linear in mlp.base_linears():
            _write_weight(ledger, linear, truncated_svd(_weight(linear), rank))
    return {"matrices": sum(len(mlp.base_linears()) for mlp in mlps)}


def _sliced_linear(linear: nn.Linear, keep: Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only the ``keep`` rows (dim 0: outputs) or columns (dim 1: inputs) of ``linear``, on the
    device ``linear`` runs on (an offloaded ``linear``'s slice is held by the new module itself)."""
    device = execution_device(linear)
    weight = _weight(linear).detach().index_select(dim, keep.to(_weight(linear).device)).to(device)
    bias = module_tensor(linear, "bias").to(device) if linear.bias is not None else None
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")  # no init allocation
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        kept_bias = bias.detach().clone() if dim == 1 else bias.detach().index_select(0, keep.to(bias.device))
        new.bias = nn.Parameter(kept_bias, requires_grad=linear.bias.requires_grad)
    return new


def _prune(adapter: ModelAdapter, ledger: Ledger, layers: list[int], *, fraction: float) -> dict:
    mlps = [mlp_modules(adapter, i, "mid_prune") for i in layers]
    for i, mlp in zip(layers, mlps, strict=True):
        wrapped = [
            n
            for n, m in zip([*mlp.input_names, mlp.output_name], [*mlp.inputs, mlp.output], strict=True)
            if is_peft_wrapped(m)
        ]
        if wrapped:
            raise UnsupportedOperatorError(
                f"mid_prune cannot shrink the PEFT-wrapped MLP module(s) {wrapped} of block {i}: their LoRA "
                "matrices would no longer fit. Prune a merged copy (merge_and_unload) or target attention only."
            )
    sizes = []
    for mlp in mlps:
        inputs, output = mlp.inputs, mlp.output
        width = output.weight.shape[1]
        # L2 importance of intermediate channel j: the norm of every weight attached to it (its rows in the input
        # projections and its column in the output projection), on the CPU (the matrices may sit on any device).
        rows = sum(_weight(m).detach().float().pow(2).sum(1).cpu() for m in inputs)
        importance = rows + _weight(output).detach().float().pow(2).sum(0).cpu()
        removed = math.floor(fraction * width)
        if removed >= width:
            raise DegradeError(f"mid_prune: fraction={fraction} would remove all {width} channels; use < 1.")
        keep = torch.sort(torch.argsort(importance, descending=True)[: width - removed]).values
        for name, module in zip(mlp.input_names, inputs, strict=True):
            ledger.replace_module(mlp.module, name, _sliced_linear(module, keep, 0))
        ledger.replace_module(mlp.module, mlp.output_name, _sliced_linear(output, keep, 1))
        sizes.append(width - removed)
    return {"intermediate_size": sizes}


def _residual_hook(alpha: float) -> Callable:
    """Forward hook making a block return ``in + α·(block(in) − in)``; α = 0 returns ``in`` itself."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Tensor | tuple) -> Tensor | tuple:
        hidden_out = output if isinstance(output, Tensor) else output[0]
        # the block's input may still be on the previous block's device (device maps): bring it to the output's
        hidden_in = (args[0] if args else kwargs["hidden_states"]).to(hidden_out.device)
        new = hidden_in if alpha == 0.0 else hidden_in + alpha * (hidden_out - hidden_in)
        return new if isinstance(output, Tensor) else (new, *output[1:])

    return hook


def _scale_blocks(adapter: ModelAdapter, ledger: Ledger, layers: list[int], alpha: float) -> dict:
    if alpha != 1.0:  # α = 1 is the identity: install nothing, so it is an exact no-op.
        for i in layers:
            ledger.hook(adapter.layers[i].register_forward_hook(_residual_hook(alpha), with_kwargs=True))
    return {"alpha": alpha}


def _drop(adapter: ModelAdapter, ledger: Ledger, layers: list[int], **_: Any) -> dict:
    return _scale_blocks(adapter, ledger, layers, 0.0)


def _deprive(adapter: ModelAdapter, ledger: Ledger, layers: list[int], *, alpha: float, **_: Any) -> dict:
    return _scale_blocks(adapter, ledger, layers, alpha)


# ---------------------------------------------------------------- registry and validation


def _fraction(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A fraction of depth in (0, 1] (``[0, 1]`` with ``allow_zero``)."""
    return validate_number(
        value, name, 0.0, 1.0, low_open=not allow_zero, high_closed=True, what="a fraction of depth", error=DegradeError
    )


@dataclass(frozen=True)
class Operator:
    """A registered operator: its defaults, how it picks blocks, and the function that applies it."""

    name: str
    doc: str
    defaults: dict[str, Any]
    apply: Callable[..., dict]
    layers: Callable[[int, dict[str, Any]], list[int]] | None = None
    #: True when the operator calibrates on text: ``degrade`` then hands it the ``tokenizer``.
    calibrated: bool = False

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Merge ``params`` over the defaults and check every value; errors say what to pass instead."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise DegradeError(f"Operator {self.name!r} has no parameter(s) {unknown}; its parameters: {allowed}.")
        merged = {**self.defaults, **params}
        for key in ("fraction", "end"):
            if key in merged:
                merged[key] = _fraction(f"{self.name}: {key}", merged[key])
        if "start" in merged:
            merged["start"] = _fraction(f"{self.name}: start", merged["start"], allow_zero=True)
            if merged["start"] >= merged["end"]:
                raise DegradeError(f"{self.name}: start={merged['start']} must be below end={merged['end']}.")
        if "bits" in merged and merged["bits"] not in quantize.RTN_BITS:
            raise DegradeError(f"{self.name}: bits={merged['bits']} is not supported; use one of {quantize.RTN_BITS}.")
        # the optional library each operator runs through is installed (nf4/int8 also: a block size it accepts)
        problem = (
            quantize.bitsandbytes_problem(self.name, merged)
            or quantize.hqq_problem(self.name, merged)
            or llmcompressor_problem(self.name)
        )
        if problem:
            raise DegradeError(problem)
        for key in ("rank", "group_size", "block_size", "samples", "seq_len"):
            value = merged.get(key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DegradeError(f"{self.name}: {key}={value!r} must be a positive integer.")
        if "seed" in merged and (not isinstance(merged["seed"], int) or merged["seed"] < 0):
            raise DegradeError(f"{self.name}: seed={merged['seed']!r} must be a non-negative integer.")
        if "alpha" in merged:
            merged["alpha"] = validate_number(
                merged["alpha"],
                f"{self.name}: alpha",
                0.0,
                1.0,
                high_closed=True,
                what="a residual scale (1 = intact)",
                error=DegradeError,
            )
        return merged


def _in_range(num_layers: int, p: dict[str, Any]) -> list[int]:
    return range_layers(num_layers, p["start"], p["end"])


def _span(num_layers: int, p: dict[str, Any]) -> list[int]:
    return span_layers(num_layers, p["fraction"], p["end"])


def _svd_op(name: str, start: float, end: float, where: str) -> Operator:
    return Operator(
        name,
        f"truncated SVD (rank r) of every MLP matrix in the {where} blocks (start < ℓ/L ≤ end)",
        {"rank": 64, "start": start, "end": end},
        lambda a, led, layers, rank, **_: _svd(a, led, layers, op=name, rank=rank),
        _in_range,
    )


def _calibrated_op(name: str, what: str) -> Operator:
    return Operator(
        name,
        f"{what} of every Linear weight in the decoder blocks, per group of group_size inputs, calibrated on "
        "samples windows of seq_len tokens of dipreg's calibration corpus shuffled with seed",
        {"bits": 4, "group_size": 64, "samples": 16, "seq_len": 128, "seed": 0},
        lambda a, led, layers, **p: _calibrated(a, led, op=name, **p),
        calibrated=True,
    )


OPERATORS: dict[str, Operator] = {
    op.name: op
    for op in (
        Operator(
            "rtn",
            "round-to-nearest symmetric quantization of every Linear weight in the decoder blocks, per output "
            "channel or per group of group_size inputs (embeddings and LM head untouched)",
            {"bits": 4, "group_size": None},
            lambda a, led, layers, **p: _rtn(a, led, **p),
        ),
        Operator(
            "nf4",
            "blockwise NF4 (absmax per block of block_size values) of every Linear weight in the decoder blocks, "
            "through bitsandbytes' quantize_4bit/dequantize_4bit",
            {"block_size": 64},
            lambda a, led, layers, **p: _nf4(a, led, **p),
        ),
        Operator(
            "int8",
            "whole-depth 8-bit per-output-channel absmax quantization (LLM.int8 without the outlier path), through "
            "bitsandbytes' int8_vectorwise_quant/dequant",
            {},
            lambda a, led, layers: _int8(a, led),
        ),
        Operator(
            "hqq",
            "Half-Quadratic Quantization (calibration-free, hqq's Quantizer on the CPU or GPU) of every Linear weight "
            "in the decoder blocks, asymmetric, per group of group_size inputs",
            {"bits": 4, "group_size": 64},
            lambda a, led, layers, **p: _hqq(a, led, **p),
        ),
        _calibrated_op("gptq", "GPTQ (llmcompressor GPTQModifier, symmetric int)"),
        _calibrated_op("awq", "AWQ (llmcompressor AWQModifier: activation-aware smoothing, asymmetric int)"),
        _svd_op("late_svd", 0.75, 1.0, "late"),
        _svd_op("mid_svd", 0.375, 0.625, "mid"),
        Operator(
            "late_drop",
            "identity replacement of fraction·L consecutive blocks ending at relative depth end",
            {"fraction": 0.125, "end": 1.0},
            _drop,
            _span,
        ),
        Operator(
            "mid_drop",
            "identity replacement of fraction·L consecutive blocks ending at relative depth end",
            {"fraction": 0.125, "end": 0.5625},
            _drop,
            _span,
        ),
        Operator(
            "mid_prune",
            "structured pruning: remove the fraction of MLP intermediate channels with the lowest L2 importance "
            "in the blocks with start < ℓ/L ≤ end",
            {"fraction": 0.5, "start": 0.375, "end": 0.625},
            lambda a, led, layers, fraction, **_: _prune(a, led, layers, fraction=fraction),
            _in_range,
        ),
        Operator(
            "deprive",
            "scale the residual contribution of the last fraction·L blocks by alpha: out = in + α·(block(in) − in)",
            {"alpha": 0.0, "fraction": 0.15, "end": 1.0},
            _deprive,
            _span,
        ),
    )
}


def get_operator(name: str) -> Operator:
    """The registered operator ``name``; a clear error listing the known ones otherwise."""
    if name not in OPERATORS:
        raise DegradeError(
            f"Unknown degradation operator {name!r}; known operators: {', '.join(OPERATORS)} "
            f"(or a preset: {', '.join(PRESETS)})."
        )
    return OPERATORS[name]


@contextlib.contextmanager
def degrade(
    model: nn.Module, op: str, *, verify: bool = False, tokenizer: Any = None, **params: Any
) -> Iterator[DegradeReport]:
    """Apply degradation ``op`` to ``model`` in place for the body of a ``with`` block, then restore it.

    The model (plain HF or PEFT-wrapped) is restored bit-exactly on exit, also when the body raises. Only the
    weights an operator changes are copied (quantization, SVD); pruning swaps in smaller modules and keeps the
    originals by reference; block dropping and deprivation use forward hooks and copy nothing.

    Every exit checks the restore cheaply (:meth:`Ledger.unrestored`: a digest of the original bytes of each weight
    the operator overwrote against its bytes now, each replaced module back, each hook gone; never the whole model)
    and raises :class:`RestoreError` (a ``RuntimeError``) naming the operator and the first weights that differ,
    e.g. when the body changed a weight's dtype or replaced a module the operator had touched.

    Contexts on one model must be exited in reverse order of entry (nested ``with`` blocks, ``ExitStack``). Exiting
    one while a context entered after it is still open (enter A, enter B, exit A) restores both, newest first, so the
    model is back to its state before A, and raises :class:`DegradeError` naming both operators; B's own exit later
    does nothing more (its changes are already undone). A model is never left silently changed.

    Args:
        model: the live model.
        op: an operator name from :data:`OPERATORS`.
        verify: also prove the restore of the whole model: hash every parameter and buffer (:func:`state_checksum`)
            before applying the operator and again after restoring it, and raise ``RuntimeError`` naming the operator
            when they differ. Checked when the body completes (an exception from the body propagates as it is, after
            the restore).
        tokenizer: the model's tokenizer; needed by the operators that calibrate on text (``gptq``, ``awq``),
            ignored by the others.
        **params: operator parameters (see README "Degradations" for every default).

    Yields:
        A :class:`DegradeReport` (blocks touched, bytes copied, details).

    Example:
        >>> with degrade(model, "late_svd", rank=64) as report:  # doctest: +SKIP
        ...     traj = dipreg.trajectories(model, tokenizer, pairs)
    """
    operator = get_operator(op)
    merged = operator.validate(params)
    adapter = ModelAdapter(model)
    layers = operator.layers(adapter.num_layers, merged) if operator.layers else list(range(adapter.num_layers))
    if not layers:
        raise DegradeError(f"{op}: the parameters {merged} select no decoder block of {adapter.num_layers}.")
    ledger = Ledger()
    apply_params = {k: v for k, v in merged.items() if k not in ("start", "end")}
    checksum = state_checksum(model) if verify else None
    entry = _Active(op_label(op, params), ledger)
    stack = _ACTIVE.setdefault(adapter.causal_lm, [])
    stack.append(entry)
    try:
        if operator.calibrated:
            apply_params["tokenizer"] = tokenizer
        details = operator.apply(adapter, ledger, layers, **apply_params)
        yield DegradeReport(op, merged, layers, ledger.backup_bytes, ledger.new_bytes, details)
    finally:
        _leave(model, stack, entry)
    if checksum is not None and entry.restored_by is None:
        check_restored(model, checksum, entry.label)


def _restore_checked(model: nn.Module, entry: _Active) -> None:
    """Undo ``entry``'s changes and raise :class:`RestoreError` when the cheap check finds any left."""
    entry.ledger.restore()
    problems = entry.ledger.unrestored(model)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RestoreError(
            f"{entry.label} did not restore the model: {'; '.join(problems[:3])}{more}. Something in the body "
            "changed what the operator had touched (a dtype or device move, a replaced module or weight); "
            "reload the model before using it."
        )


def _leave(model: nn.Module, stack: list[_Active], entry: _Active) -> None:
    """Exit ``entry``: restore it when it is the newest context on the model; when newer ones are still open,
    restore them too (newest first) and raise :class:`DegradeError`. A context already restored that way does
    nothing."""
    if entry.restored_by is not None:
        return
    index = next(i for i, active in enumerate(stack) if active is entry)
    newer = stack[index + 1 :]
    del stack[index:]
    errors: list[Exception] = []
    for active in [*reversed(newer), entry]:
        if active is not entry:
            active.restored_by = entry.label
        try:
            _restore_checked(model, active)
        except RestoreError as err:  # restore the rest before reporting
            errors.append(err)
    if newer:
        names = ", ".join(repr(active.label) for active in reversed(newer))
        error = DegradeError(
            f"degrade contexts exited out of order: {entry.label!r} was exited while {names} (entered after it) "
            f"{'was' if len(newer) == 1 else 'were'} still open; all {len(newer) + 1} were restored, newest first, "
            f"so the model is back to its state before {entry.label!r}. Exit degrade contexts in reverse order of "
            "entry (nest the with blocks)."
        )
        if errors:
            raise error from errors[0]
        raise error  # an exception from the body stays attached as the context
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- CLI spec


def _value(text: str) -> Any:
    if text.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    raise DegradeError(f"Parameter value {text!r} is not a number (or 'none').")


def parse_ops(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``late_svd:rank=64,rtn:bits=4,group_size=128,late_drop`` into ``[(op, params), ...]``.

    Commas separate items; ``name`` or ``name:key=value`` starts an operator; a bare ``key=value`` adds a
    parameter to the operator before it; a preset name (:data:`~dipreg.eval.degradation.presets.PRESETS`, e.g.
    ``retention``) stands for its ops. Every operator and parameter is validated.
    """
    ops: list[tuple[str, dict[str, Any]]] = []
    for item in (part.strip() for part in expand_presets(spec).split(",")):
        if not item:
            continue
        if ":" in item or "=" not in item:
            name, _, rest = item.partition(":")
            get_operator(name.strip())
            ops.append((name.strip(), {}))
            item = rest
            if not item:
                continue
        if not ops:
            raise DegradeError(f"Parameter {item!r} comes before any operator in --ops {spec!r}.")
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DegradeError(f"Expected key=value after {ops[-1][0]!r} in --ops, got {item!r}.")
        ops[-1][1][key.strip()] = _value(value.strip())
    if not ops:
        raise DegradeError("--ops is empty: name at least one operator, e.g. late_svd:rank=64.")
    for name, params in ops:
        get_operator(name).validate(params)
    return ops


def op_label(name: str, params: dict[str, Any]) -> str:
    """``name:key=value,...`` with the given (non-default-filled) parameters, for tables and JSON keys."""
    return name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
