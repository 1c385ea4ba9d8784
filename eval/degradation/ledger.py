"""Undo log for in-place degradations: every change to a live model goes through a :class:`Ledger`.

A ledger copies only the weights it overwrites, keeps replaced modules by reference (no copy) and removes its
hooks, so :meth:`Ledger.restore` brings the model back bit-exactly. It never deep-copies a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


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

    def overwrite(self, param: Tensor, value: Tensor) -> None:
        """Copy ``param`` aside, then write ``value`` into it in place (the Parameter object is kept)."""
        if value.shape != param.shape:
            raise ValueError(f"cannot overwrite a {tuple(param.shape)} weight with a {tuple(value.shape)} value")
        backup = param.detach().clone()
        self.backup_bytes += backup.nbytes
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
        self._undo.append(lambda: setattr(parent, name, old))

    def hook(self, handle: RemovableHandle) -> None:
        """Remove ``handle`` on restore."""
        self._undo.append(handle.remove)

    def restore(self) -> None:
        """Undo every recorded change, last first."""
        while self._undo:
            self._undo.pop()()


def state_checksum(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every parameter and buffer of ``model``."""
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_restored(model: nn.Module, checksum: str, what: str) -> None:
    """Raise ``RuntimeError`` naming ``what`` unless ``model``'s :func:`state_checksum` is still ``checksum``."""
    if state_checksum(model) != checksum:
        raise RuntimeError(f"{what} did not restore the model bit-exactly (checksum changed).")
