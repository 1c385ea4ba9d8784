"""Full-parameter access to a model whose weights a training strategy shards across ranks.

Under FSDP (``FullyShardedDataParallel``, "FSDP1"), FSDP2 (``fully_shard``: every parameter a ``DTensor``; what
Lightning's ``ModelParallelStrategy`` uses) and DeepSpeed ZeRO-3, each rank holds a slice of every weight between
forwards. A module's own forward gathers the weights it needs, but dipreg also reads weights *outside* a forward
(the two unembedding rows ``lm_head.weight[ids]``, see :meth:`dipreg.adapter.ModelAdapter.unembed_rows`), calls the
backbone without the root module's forward (so the root's own weights, the embeddings and the final norm, are
never gathered by it), and degrades whole matrices. This module gives both callbacks the strategy's own
full-parameter context for that:

- :func:`gathered_unembedding` for the probe: the weights that live outside the decoder blocks (embeddings, final
  norm, unembedding) are gathered for the duration; the blocks still gather their own in their forwards.
- :class:`FullWeights` for the retention callback: every weight gathered into a full tensor, changed in place, and
  written back into each rank's shard (:meth:`FullWeights.gathered`).

Without sharding both do nothing. Every function here is collective under sharding: every rank must call it, in the
same order. Only FSDP2 runs on a CPU (gloo), so only the FSDP2 path is exercised by the test suite; the FSDP1 and
DeepSpeed paths use the strategies' documented contexts (``FullyShardedDataParallel.summon_full_params`` and
``deepspeed.zero.GatheredParameters``) and need a GPU machine to be tested.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dipreg.adapter import ModelAdapter

Backend = Literal["fsdp2", "fsdp1", "deepspeed"]


class ShardingError(RuntimeError):
    """A sharded weight could not be gathered; the message says what to pass or change."""


def _fsdp2_modules(root: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def _fsdp1_modules(root: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in root.modules() if isinstance(m, FullyShardedDataParallel)]


def sharding_backend(root: nn.Module) -> Backend | None:
    """Which strategy shards ``root``'s weights: ``"fsdp2"``, ``"fsdp1"``, ``"deepspeed"`` (ZeRO-3), or ``None``."""
    if _fsdp2_modules(root):
        return "fsdp2"
    if _fsdp1_modules(root):
        return "fsdp1"
    if any(hasattr(p, "ds_id") for p in root.parameters()):
        return "deepspeed"
    return None


def _outside_blocks(modules: list[nn.Module], adapter: ModelAdapter) -> list[nn.Module]:
    """The ``modules`` that are neither a decoder block nor inside one (whose weights no block forward gathers)."""
    inside = {id(m) for layer in adapter.layers for m in layer.modules()}
    return [m for m in modules if id(m) not in inside]


def _check_unembedding(adapter: ModelAdapter) -> None:
    weight = adapter.lm_head.weight
    if isinstance(weight, DTensor) or weight.dim() != 2 or weight.shape[0] < adapter.causal_lm.config.vocab_size:
        raise ShardingError(
            f"The unembedding of {type(adapter.causal_lm).__name__} is still sharded inside the full-parameter "
            f"context ({type(weight).__name__} of shape {tuple(weight.shape)}): the module that shards it is not "
            "inside the module given as the root. Pass the outermost module (the Trainer's model) as root."
        )


@contextlib.contextmanager
def gathered_unembedding(root: nn.Module, model: nn.Module) -> Iterator[None]:
    """Gather the weights outside the decoder blocks of ``model`` for the body of a ``with`` block.

    Inside, :meth:`~dipreg.adapter.ModelAdapter.unembed_rows` reads full unembedding rows, the final norm is full,
    and a forward of the backbone (without the root module's forward) finds its embeddings full; every decoder
    block still gathers its own weights in its forward, so every rank must run the same number of forwards.
    Nothing is written back. Without sharding it does nothing.

    Args:
        root: the outermost module the strategy wrapped or sharded (``trainer.model``); it must contain the model.
        model: the HF model the probe reads (inside ``root``).

    Raises:
        ShardingError: the unembedding is still sharded inside the context (``root`` does not hold its owner).
    """
    backend = sharding_backend(root)
    if backend is None:
        yield
        return
    adapter = ModelAdapter(model)
    with contextlib.ExitStack() as stack:
        if backend == "fsdp2":
            modules = _fsdp2_modules(root)
            # FSDP2 decides which module is its root at the first forward of any of them. The probe calls the
            # backbone and the blocks directly, so a probe before the first training step would make every block a
            # root of its own and break the training forward after it. torch has no public call for this (2.13):
            # initialise the outermost module as the root now (a no-op once a forward has run).
            modules[0]._get_fsdp_state()._lazy_init()  # type: ignore[operator]
            owners = _outside_blocks(modules, adapter)
            for owner in owners:
                owner.unshard()  # type: ignore[operator]  (FSDPModule.unshard: this module's own parameters)
                stack.callback(owner.reshard)  # type: ignore[arg-type]
        elif backend == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel

            for owner in _outside_blocks(_fsdp1_modules(root), adapter):
                stack.enter_context(FullyShardedDataParallel.summon_full_params(owner, recurse=False, writeback=False))
        else:  # ZeRO-3 gathers a module's weights in its forward (norm, embeddings); the head's rows are read raw
            import deepspeed  # type: ignore[import-not-found]

            head = [p for p in adapter.lm_head.parameters() if hasattr(p, "ds_id")]
            stack.enter_context(deepspeed.zero.GatheredParameters(head, modifier_rank=None))
        _check_unembedding(adapter)
        yield


def local_checksum(root: nn.Module) -> str:
    """SHA-256 over this rank's own bytes of every parameter and buffer of ``root``: the local shard of a sharded
    weight (FSDP2 ``DTensor.to_local()``, DeepSpeed ``ds_tensor``), the tensor itself otherwise.

    Equal before and after a change means this rank's storage came back bit-exactly; no communication."""
    digest = hashlib.sha256()
    for name, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        local = tensor.to_local() if isinstance(tensor, DTensor) else getattr(tensor, "ds_tensor", tensor)
        data = local.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def all_ranks_agree(flag: bool) -> bool:
    """``flag`` and-reduced over every rank (``flag`` itself without a process group), so that every rank takes the
    same branch after a check one rank may fail (a rank raising alone would leave the others waiting in a
    collective)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([0 if flag else 1], device=device)
    torch.distributed.all_reduce(value)
    return int(value.item()) == 0


class FullWeights:
    """Every weight of ``root`` as one full tensor on every rank, for as long as :meth:`gathered` is open.

    On entering :meth:`gathered`, FSDP2 ``DTensor`` parameters are replaced in their modules by full
    ``nn.Parameter`` objects (all-gathered); on exit the full values are written into each rank's shard and the
    ``DTensor`` parameters are put back. The full Parameter objects are kept and refilled across entries, so code that
    holds references to them (a degradation's undo log) writes into the model in a later entry too. No forward may
    run inside (FSDP2 would gather into its own buffers). FSDP1 uses ``summon_full_params(writeback=True)`` and
    DeepSpeed ZeRO-3 ``GatheredParameters(modifier_rank=0)``, which keep the Parameter objects themselves.
    Without sharding :meth:`gathered` does nothing.

    Memory: one full copy of the model's weights per rank while gathered.

    Args:
        root: the outermost module the strategy wrapped or sharded (``trainer.model``).
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.backend = sharding_backend(root)
        self._slots = [
            (module, name, param)
            for module in root.modules()
            for name, param in module._parameters.items()
            if isinstance(param, DTensor)
        ]
        self._full: dict[int, nn.Parameter] = {}

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full weights in the model for the body; changes made to them land in every rank's shard on exit."""
        if self.backend is None:
            yield
        elif self.backend == "fsdp2":
            self._gather_dtensors()
            try:
                yield
            finally:
                self._scatter_dtensors()
        elif self.backend == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel

            outermost = _fsdp1_modules(self.root)[0]  # modules() lists parents first
            with FullyShardedDataParallel.summon_full_params(outermost, writeback=True, recurse=True):
                yield
        else:
            import deepspeed  # type: ignore[import-not-found]

            with deepspeed.zero.GatheredParameters(list(self.root.parameters()), modifier_rank=0):
                yield

    @torch.no_grad()
    def _gather_dtensors(self) -> None:
        for module, name, sharded in self._slots:
            full = self._full.get(id(sharded))
            value = sharded.full_tensor()  # collective: same order on every rank
            if full is None:
                full = self._full[id(sharded)] = nn.Parameter(value.clone(), requires_grad=sharded.requires_grad)
            else:
                full.copy_(value)
            module._parameters[name] = full

    @torch.no_grad()
    def _scatter_dtensors(self) -> None:
        written: set[int] = set()
        for module, name, sharded in self._slots:
            if id(sharded) not in written:  # a tied weight is registered twice and written once
                full = self._full[id(sharded)]
                # src_data_rank=None: each rank cuts its own chunk of its own full tensor, no communication.
                chunk = distribute_tensor(full.detach(), sharded.device_mesh, sharded.placements, src_data_rank=None)
                sharded.to_local().copy_(chunk.to_local())  # to_local() aliases the shard's storage
                written.add(id(sharded))
            module._parameters[name] = sharded
