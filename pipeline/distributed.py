"""Data-parallel training under torchrun (PyTorch DDP): this process's rank, the process group, what ranks share.

The number of processes is an execution detail, like CPU threads: `TRAIN_PROCESSES=N dvc repro` (or `torchrun
--nproc_per_node N -m pipeline.stages.train ...`) trains with N processes without changing any param, so a change
retrains nothing. The recipe's global batch and schedule stay; each process takes its share of every batch.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.common import PipelineError

PROCESSES_ENV = "TRAIN_PROCESSES"  # > 1: the train stage starts itself under torchrun with that many processes
TIMEOUT_S = 120  # a collective that waits longer for another process ends this one with an error, not a hang


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0  # the rank on this machine: its GPU

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes."""
        return self.rank == 0


ONE_PROCESS = Ranks()


def ranks() -> Ranks:
    """This process's place, from the environment torchrun sets (one process without it)."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if env["WORLD_SIZE"] is None:
        return ONE_PROCESS
    return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"] or 0))


def requested() -> int:
    """The processes TRAIN_PROCESSES asks for (1 when unset)."""
    value = os.environ.get(PROCESSES_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise PipelineError(f"{PROCESSES_ENV}={value!r}: give a whole number of processes, 1 or more")
    return int(value)


def torchrun_command(processes: int, argv: list[str]) -> list[str]:
    """This stage again, as `processes` processes on this machine under torchrun (a free local port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "pipeline.stages.train", *argv]


def join(device: torch.device, at: Ranks) -> torch.device:
    """Join the process group (gloo on the CPU, NCCL on CUDA, TIMEOUT_S for every collective); returns the
    device of this rank (its own GPU)."""
    if at.world == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", at.local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def total(*values: float | torch.Tensor, at: Ranks, device: torch.device) -> list[float]:
    """The sums over all ranks of each value (the values themselves with one process)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if at.world > 1:
        dist.all_reduce(t)
    return t.tolist()
