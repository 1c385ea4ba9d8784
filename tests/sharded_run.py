"""A LoRA fine-tune of a tiny Llama with DipMonitor and CompressionRetention under a chosen strategy, recording
what each rank's probe did. Run by ``tests/test_sharded_probe.py``: in-process for one process, and for two as
``python tests/sharded_run.py STRATEGY[,STRATEGY...] OUT`` started once per rank by :func:`start` (``LOCAL_RANK``
set, so Lightning launches no process of its own): each rank fits once per strategy, in order, in the one process
group the first fit sets up, so the two strategies cost one interpreter start and one group per rank.

A last job, ``health``, fits under DDP with :class:`~dipreg.callbacks.TrainingHealth` while one rank's loss turns
NaN (:func:`run_health`). Each rank writes ``OUT/<strategy>/rank<r>.json`` (``OUT/rank<r>.json`` for :func:`run`
called directly): per probe, the ids of the pairs it measured and the batch rows of every backbone forward it ran
(a forward pre-hook counts them); its monitor history; what a ``DipTracker`` left to find its rank read from the
final weights; and the retention scalars of the final weights with its shard checksum before and after.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model, tiny_tokenizer

from dipreg.adapter import ModelAdapter
from dipreg.callbacks import CompressionRetention, DipMonitor, DipTracker, TrainingHealth
from dipreg.callbacks.probe import find_hf_model
from dipreg.callbacks.sharding import local_checksum
from dipreg.stimuli import MinimalPair


def _pair(i: int, a: str, b: str, pos: str, neg: str, family: str, safety: bool = False) -> MinimalPair:
    return MinimalPair(f"p{i}", a, b, pos, neg, family, safety)


#: Seven pairs: two ranks measure 4 and 3. The whole set shares no token prefix ("Statement" vs "Question"),
#: but rank 1's shard (p1, p3, p5) does: a rank deciding alone would run one extra (prefix) forward.
PAIRS = [
    _pair(0, "Statement : ice is cold . True or False ?", "Statement : ice is not cold . True or False ?", " True",
          " False", "negation"),
    _pair(1, "Question : is it wrong to steal ? Answer :", "Question : is it right to steal ? Answer :", " Yes",
          " No", "value_flip", True),
    _pair(2, "Question : is it good to help the cat ?", "Question : is it bad to help the cat ?", " Yes", " No",
          "value_flip"),
    _pair(3, "Question : Alice chased Bob . Who chased ? Answer :",
          "Question : Alice was chased by Bob . Who chased ? Answer :", " Alice", " Bob", "role_binding"),
    _pair(4, "Question : is it bad to help the dog ?", "Question : is it good to help the dog ?", " No", " Yes",
          "value_flip", True),
    _pair(5, "Question : is the cat good ? Answer :", "Question : is the cat bad ? Answer :", " Yes", " No",
          "value_flip"),
    _pair(6, "Question : is it good to steal ?", "Question : is it not good to steal ?", " Yes", " No", "negation"),
]  # fmt: skip

RETENTION_OPS = "late_svd:rank=4,rtn:bits=3"
#: The strategies the two-process test runs, in this order, in one launch.
STRATEGIES = ("ddp", "fsdp2")
#: After them, in the same launch: a DDP fit whose loss turns non-finite on one rank (see :func:`run_health`).
JOBS = (*STRATEGIES, "health")
#: The rank whose loss :func:`run_health` makes NaN, and the (1-based) optimizer step whose batch it spoils.
NAN_RANK, NAN_STEP = 1, 3


class ShardableLoRAModule(pl.LightningModule):
    """A user's LoRA module; under ``ModelParallelStrategy`` it shards every decoder block and then the whole model
    with FSDP2 ``fully_shard`` (the recipe of Lightning's FSDP2 docs; the root is the model ``training_step``
    calls, so that its forward gathers the embeddings and the head)."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        self.tokenizer = tiny_tokenizer.__wrapped__()  # the conftest fixture's function
        self.lr = lr

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in ModelAdapter(self.net).layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)  # the root: training_step calls its forward

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class ProbeRecorder(Callback):
    """Counts the backbone forwards of every probe of ``monitor`` (and their batch rows) and keeps the ids each
    probe measured; on train end evaluates ``retention`` and writes ``out/rank<r>.json``."""

    def __init__(self, monitor: DipMonitor, retention: CompressionRetention, out: Path) -> None:
        self.monitor, self.retention, self.out = monitor, retention, out
        self.records: list[dict] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        probe = self.monitor.probe
        run = probe.run
        rows: list[list[int]] = []

        def count(_module, _args, kwargs) -> None:
            if rows:
                rows[-1].append(int(kwargs["input_ids"].shape[0]))

        def recorded_run(*args, **kwargs):
            rows.append([])
            result = run(*args, **kwargs)
            self.records.append({"ids": result.item_ids, "rows": rows.pop()})
            return result

        ModelAdapter(find_hf_model(pl_module)).backbone.register_forward_pre_hook(count, with_kwargs=True)
        probe.run = recorded_run

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A DipTracker given no rank: it reads rank and world size from torch.distributed, as in a Fabric or DDP loop
        tracker = DipTracker(PAIRS, tokenizer=pl_module.tokenizer, lenses=("logit", "causal"), batch_size=2)
        reading = tracker.probe(trainer.model, trainer.global_step)
        before = local_checksum(trainer.model)
        retention = self.retention.evaluate(pl_module, trainer.model)
        record = {
            "probes": self.records,
            "history": self.monitor.history,
            "tracker": {"ids": reading.probe.item_ids, "scalars": reading.scalars},
            # what EarlyStopping / ModelCheckpoint would read on this rank
            "published": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("dip/")},
            "retention": retention,
            "shard_restored": local_checksum(trainer.model) == before,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run(out: Path, strategy: str, devices: int, *, lr: float = 0.5, max_steps: int = 2) -> None:
    """Fit ``max_steps`` SGD steps on 4 fixed sequences, all of them every step (an epoch): one process reads 4, two
    read 2 each, whichever 2 the distributed sampler deals (DDP and FSDP average their gradients, so every run makes
    the same update). Probes at every step with the logit and causal lenses."""
    monitor = DipMonitor(PAIRS, every_n_steps=1, lenses=("logit", "causal"), batch_size=2, log_figures=False)
    # on="validation_end" with no validation loop: set up by the Trainer, evaluated by ProbeRecorder at train end.
    retention = CompressionRetention(PAIRS, RETENTION_OPS, on="validation_end", batch_size=2)
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)  # type: ignore[assignment]
    trainer = pl.Trainer(
        default_root_dir=out,
        max_steps=max_steps,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        callbacks=[monitor, retention, ProbeRecorder(monitor, retention, out)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = torch.randint(2, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    trainer.fit(ShardableLoRAModule(lr), DataLoader(list(data), batch_size=4 // devices))


class NaNOnOneRank(ShardableLoRAModule):
    """Rank :data:`NAN_RANK` returns a NaN loss for the batch of optimizer step :data:`NAN_STEP`; counts its steps."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == NAN_RANK and self.trainer.global_step + 1 == NAN_STEP:
            loss = loss * float("nan")
        return loss


def run_health(out: Path, devices: int) -> None:
    """A DDP fit of up to 8 steps with :class:`TrainingHealth` attached; each rank writes ``out/rank<r>.json``: the
    error that stopped it (type and message), its optimizer step count then, and how many batches it trained."""
    module = NaNOnOneRank()
    trainer = pl.Trainer(
        default_root_dir=out,
        max_steps=8,
        accelerator="cpu",
        devices=devices,
        strategy="ddp",
        logger=False,
        callbacks=[TrainingHealth(diverged_steps=None)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = torch.randint(2, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    record: dict = {"error": None, "message": None}
    try:
        trainer.fit(module, DataLoader(list(data), batch_size=4 // devices))
    except Exception as err:  # what stopped this rank, recorded for the test
        record = {"error": type(err).__name__, "message": str(err)}
    record |= {"global_step": trainer.global_step, "training_steps": module.training_steps}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def start(strategies: list[str], out: Path, world_size: int = 2) -> list[subprocess.Popen]:
    """Start this script once per rank (the environment ``torchrun`` would give each); :func:`finish` waits."""
    return launch(Path(__file__), [",".join(strategies), str(out)], world_size)


def launch(script: Path, args: list[str], world_size: int = 2) -> list[subprocess.Popen]:
    """Start ``python script *args`` once per rank with the environment ``torchrun`` would give each (``LOCAL_RANK``
    set, so Lightning launches no process of its own); :func:`finish` waits."""
    with socket.socket() as sock:  # a free port for the process group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = []
    for rank in range(world_size):
        env = {
            **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size), "NODE_RANK": "0", "LOCAL_RANK": str(rank), "RANK": str(rank),
        }  # fmt: skip
        command = [sys.executable, str(script), *args]
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return ranks


def finish(ranks: list[subprocess.Popen], timeout: float = 300) -> None:
    """Wait for every rank started by :func:`start`; a rank that failed fails with its log's tail. A rank that
    hangs (ranks running different collectives, the FSDP hazard the test guards against) fails at ``timeout``."""
    logs = [proc.communicate(timeout=timeout)[0] for proc in ranks]
    for rank, (proc, log) in enumerate(zip(ranks, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{log[-4000:]}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1].split(","):
        if name == "health":
            run_health(Path(sys.argv[2]) / name, 2)
        else:
            run(Path(sys.argv[2]) / name, name, 2)
