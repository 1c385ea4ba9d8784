"""Where a model's tensors live when accelerate places it (``device_map``, CPU or disk offload).

Under accelerate, a block may run on another device than the embedding, and an offloaded module keeps its weights
off the module: its parameters sit on the ``meta`` device and a hook loads them from a *weights map* (CPU memory or
files on disk) just before each forward. This module answers, for any module, where it runs and what its weights
are, and names the slot of the weights map that a degradation may swap (``eval.degradation``). It reads; it never
changes a model. accelerate is imported only when a module carries its hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping

import torch
from torch import Tensor, nn


def _hooks(module: nn.Module) -> list[object]:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` is unpacked), outermost first."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def _align_hook(module: nn.Module) -> object | None:
    """The hook that places ``module`` (it has ``execution_device``), or ``None``."""
    return next((h for h in _hooks(module) if hasattr(h, "execution_device")), None)


def _as_device(device: int | str | torch.device) -> torch.device:
    # accelerate stores a GPU as its index: torch.device(0) is cuda:0.
    return device if isinstance(device, torch.device) else torch.device(device)


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device when it has one, else the device
    of its first parameter or buffer that is not on ``meta`` (for a dispatched parent, the first placed child)."""
    for sub in module.modules():
        hook = _align_hook(sub)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return _as_device(hook.execution_device)  # type: ignore[attr-defined]
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if not tensor.is_meta:
                return tensor.device
    return torch.device("cpu")


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s own weights off the module (loaded for each forward)."""
    hook = _align_hook(module)
    return bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None


def module_tensor(module: nn.Module, name: str) -> Tensor:
    """The value of ``module``'s own parameter or buffer ``name``: the tensor itself, or for an offloaded module
    the value its hook would load (from CPU memory or disk; on that storage device, not moved)."""
    tensor = getattr(module, name)
    if not tensor.is_meta:
        return tensor
    if not is_offloaded(module):
        raise RuntimeError(
            f"{type(module).__name__}.{name} is on the meta device and no accelerate offload hook holds its value: "
            "the model was not fully loaded (load it with dipreg.load_model or dispatch it with accelerate)."
        )
    return _align_hook(module).weights_map[name]  # type: ignore[union-attr]


def named_tensor(model: nn.Module, qualified_name: str) -> Tensor:
    """:func:`module_tensor` by its name in ``model`` (``"model.layers.3.mlp.up_proj.weight"``)."""
    owner, _, leaf = qualified_name.rpartition(".")
    return module_tensor(model.get_submodule(owner) if owner else model, leaf)


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """The body sees ``module``'s real weights (on its execution device) even when accelerate offloads them
    (:func:`accelerate.utils.align_module_device`); a module that is not offloaded is left as it is."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def offload_slot(module: nn.Module, name: str) -> tuple[MutableMapping[str, Tensor], str] | None:
    """Where the next forward of an offloaded ``module`` reads ``name`` from: ``(mapping, key)`` such that putting a
    tensor at ``mapping[key]`` changes what the module computes with; ``None`` when ``module`` is not offloaded.

    accelerate's weights map is a prefixed view of a dict (CPU offload) or of an ``OffloadedWeightsLoader`` whose
    in-memory ``state_dict`` takes precedence over the files on disk; either way the slot is a plain dict entry.
    """
    if not is_offloaded(module):
        return None
    weights = _align_hook(module).weights_map  # type: ignore[union-attr]
    key = name
    while hasattr(weights, "dataset") and hasattr(weights, "prefix"):  # accelerate's PrefixedDataset
        key = weights.prefix + key
        weights = weights.dataset
    store = getattr(weights, "state_dict", weights)  # OffloadedWeightsLoader keeps overrides in .state_dict
    if not isinstance(store, MutableMapping):
        raise TypeError(f"Cannot write the offloaded weight {key!r}: its weights map is a {type(store).__name__}.")
    return store, key
