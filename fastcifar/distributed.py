"""Data-parallel training across processes (torchrun): one process per device, DistributedDataParallel.

`torchrun --nproc_per_node=N -m fastcifar.train ...` starts N copies of the training; torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) tells each its place. Without it everything here is a
no-op for a single process (world size 1), so the same code path trains alone or in a group.

The configured batch size is the *global* batch: each of the N ranks takes batch_size / N images per step,
DDP averages the gradients, and the one-cycle schedule steps once per (global) step, so a run on N devices
follows the same recipe as on one. Metrics are summed over ranks before anything is printed or saved.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from fastcifar.errors import FastCifarError


class DistributedError(FastCifarError):
    """The process group could not start (or the setup cannot be split across the ranks)."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """This process's place, from the variables torchrun sets (a single process without them)."""
    try:
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err})") from None


def start(dist: Dist, device: torch.device, timeout_s: float) -> None:
    """Join the process group (NCCL for CUDA, gloo for CPU); a no-op for a single process."""
    if not dist.enabled or torch_dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        # device_id binds the NCCL communicator to this rank's GPU at once (no lazy init on first collective)
        extra = {"device_id": device} if device.type == "cuda" else {}
        torch_dist.init_process_group(backend, rank=dist.rank, world_size=dist.world_size,
                                      timeout=dt.timedelta(seconds=timeout_s), **extra)
    except (RuntimeError, ValueError, OSError) as err:  # ValueError: missing MASTER_ADDR etc.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(f"cannot start the {backend} process group of {dist.world_size} processes as rank "
                               f"{dist.rank} ({first}); start with torchrun and check --master_addr/--master_port "
                               f"and that every rank is up (run.dist_timeout_s={timeout_s:g})") from None


# DDP's Reducer keeps the last reference to the gloo process group once destroy_process_group has run. Freeing
# it then (in the main thread, which holds the GIL) can deadlock: ~ProcessGroupGloo joins gloo's run-loop
# threads while one of them waits for the GIL to free a tensor (seen under CPU contention: a finished rank
# hung forever in that join). So wrapped models are kept until the process ends, and the training command
# leaves a distributed run with os._exit (see training.main), never running those destructors.
_KEPT: list[Any] = []


def keep_until_exit(obj: Any) -> None:
    """Hold a reference to `obj` (a DDP-wrapped model) for the life of the process (see _KEPT)."""
    _KEPT.append(obj)


def stop(wait: bool = True) -> None:
    """Leave the process group. `wait`: all ranks meet first (after a normal end: a rank that left early can
    make a gloo shutdown wait for it forever); not after an error, when the others may never get there."""
    if torch_dist.is_initialized():
        if wait:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def split_batch(batch_size: int, dist: Dist) -> int:
    """The per-rank batch for a global `batch_size`."""
    if batch_size % dist.world_size:
        raise DistributedError(f"data.batch_size {batch_size} does not divide by the world size {dist.world_size}; "
                               f"choose a multiple of {dist.world_size} (it is the global batch, split across ranks)")
    return batch_size // dist.world_size


def all_sum(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64); the values themselves for a single process."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t.tolist()


def all_max(value: float, dist: Dist, device: torch.device) -> float:
    if not dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return float(t.item())


def gather(obj: Any, dist: Dist) -> list[Any]:
    """Every rank's `obj` (a list on every rank; [obj] for a single process)."""
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, dist: Dist) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.enabled:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


class AgreedStop:
    """A stop flag all ranks agree on: a signal may reach the ranks at different steps, so every `every`-th
    poll the flags are max-reduced, and all ranks stop at the same step. (On a single process: the flag.)"""

    def __init__(self, local: Any, dist: Dist, device: torch.device, every: int) -> None:
        self.local, self.dist, self.device, self.every = local, dist, device, every
        self.polls, self.agreed = 0, False

    def __call__(self) -> bool:
        if not self.dist.enabled:
            return self.local()
        self.polls += 1
        if not self.agreed and self.polls % self.every == 0:
            self.agreed = all_max(float(self.local()), self.dist, self.device) > 0  # collective: all ranks poll
        return self.agreed

    @property
    def signum(self) -> int | None:
        return self.local.signum or (15 if self.agreed else None)  # a rank may stop on another rank's SIGTERM
