"""Undo log for in-place degradations: every change to a live model goes through a :class:`Ledger`.

A ledger copies only the weights it overwrites, keeps replaced modules by reference (no copy) and removes its
hooks, so :meth:`Ledger.restore` brings the model back bit-exactly. It never deep-copies a model.
:meth:`Ledger.unrestored` checks the restore cheaply: a digest of every overwritten weight's original bytes against
its bytes now, the original module back in each replaced slot, each hook gone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dipreg.devices import named_tensor

#: Marks a weights-map slot that was empty before :meth:`Ledger.swap_entry` filled it.
_ABSENT = object()


def _hash_tensor(digest: Any, tensor: Tensor) -> None:
    """Feed ``dtype|shape|`` and the raw bytes of ``tensor`` into ``digest`` (bit-exact: ``-0.0`` and NaN payloads
    count). The one encoding both :func:`tensor_digest` and :func:`state_checksum` use."""
    data = tensor.detach().cpu().contiguous()
    digest.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 over the dtype, shape and raw bytes of one tensor."""
    digest = hashlib.sha256()
    _hash_tensor(digest, tensor)
    return digest.hexdigest()


@dataclass
class Ledger:
    """Records changes to a model and undoes them in reverse order.

    Attributes:
        backup_bytes: bytes copied to keep the originals of overwritten weights.
        new_bytes: bytes of parameters in replacement modules (alive while the change is in place).
    """

    backup_bytes: int = 0
    new_bytes: int = 0
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _weights: list[tuple[Tensor, str]] = field(default_factory=list)
    _modules: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    _hooks: list[RemovableHandle] = field(default_factory=list)
    _entries: list[tuple[MutableMapping[str, Tensor], str, object]] = field(default_factory=list)

    def overwrite(self, param: Tensor, value: Tensor) -> None:
        """Copy ``param`` aside (and record a digest of its original bytes), then write ``value`` into it in place
        (the Parameter object is kept)."""
        if value.shape != param.shape:
            raise ValueError(f"cannot overwrite a {tuple(param.shape)} weight with a {tuple(value.shape)} value")
        backup = param.detach().clone()
        self.backup_bytes += backup.nbytes
        self._weights.append((param, tensor_digest(backup)))
        with torch.no_grad():
            param.copy_(value)

        def undo() -> None:
            with torch.no_grad():
                param.copy_(backup)

        self._undo.append(undo)

    def replace_module(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        """Put ``new`` at ``parent.<name>``; the original module is kept by reference and put back on restore."""
        old = parent._modules[name]
        self.new_bytes += sum(p.nbytes for p in new.parameters())
        setattr(parent, name, new)
        self._modules.append((parent, name, old))
        self._undo.append(lambda: setattr(parent, name, old))

    def swap_entry(self, mapping: MutableMapping[str, Tensor], key: str, value: Tensor) -> None:
        """Put ``value`` at ``mapping[key]`` (the slot an offloaded weight is loaded from, see
        :func:`dipreg.devices.offload_slot`); the original entry, or its absence, is kept by reference and put back on
        restore (no copy)."""
        old = mapping.get(key, _ABSENT)
        self.new_bytes += value.nbytes
        mapping[key] = value
        self._entries.append((mapping, key, old))

        def undo() -> None:
            if old is _ABSENT:
                del mapping[key]
            else:
                mapping[key] = old  # type: ignore[assignment]

        self._undo.append(undo)

    def hook(self, handle: RemovableHandle) -> None:
        """Remove ``handle`` on restore."""
        self._hooks.append(handle)
        self._undo.append(handle.remove)

    def restore(self) -> None:
        """Undo every recorded change, last first."""
        while self._undo:
            self._undo.pop()()

    def unrestored(self, model: nn.Module | None = None) -> list[str]:
        """What a :meth:`restore` left changed, as short descriptions (empty when everything is back).

        Cheap: it hashes only the weights this ledger overwrote (their original bytes were hashed when they were
        backed up), checks that every replaced module is back in its slot and that every hook is gone. With
        ``model``, it also checks that each overwritten weight still belongs to ``model`` (a body that swapped a
        module or a Parameter would leave the restored tensor outside the model). Weights are named by their
        name in ``model`` when given.
        """
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)} if model is not None else {}

        def label(tensor: Tensor, index: int) -> str:
            return names.get(id(tensor), f"overwritten weight #{index} {tuple(tensor.shape)}")

        problems = []
        for index, (param, original) in enumerate(self._weights):
            if model is not None and id(param) not in names:
                problems.append(f"{label(param, index)} is no longer a parameter of the model")
            elif tensor_digest(param) != original:
                problems.append(f"{label(param, index)} differs from its original bytes")
        for parent, name, old in self._modules:
            if parent._modules.get(name) is not old:
                problems.append(f"module {type(parent).__name__}.{name} is not the original module")
        for mapping, key, old in self._entries:
            if mapping.get(key, _ABSENT) is not old:
                problems.append(f"offloaded weight {key} is not its original entry")
        for handle in self._hooks:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and handle.id in hooks:
                problems.append(f"forward hook #{handle.id} is still installed")
        return problems


def state_checksum(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every parameter and buffer of ``model``. A weight that
    accelerate offloads (a ``meta`` parameter) is hashed from the value its hook loads, so a dispatched model has
    the checksum of the same model in one piece."""
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        digest.update(f"{name}|".encode())
        _hash_tensor(digest, named_tensor(model, name) if tensor.is_meta else tensor)
    return digest.hexdigest()


def check_restored(model: nn.Module, checksum: str, what: str) -> None:
    """Raise ``RuntimeError`` naming ``what`` unless ``model``'s :func:`state_checksum` is still ``checksum``."""
    if state_checksum(model) != checksum:
        raise RuntimeError(f"{what} did not restore the model bit-exactly (checksum changed).")
