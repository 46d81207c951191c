"""Run under torchrun by tests/test_distributed.py. `DATA_DIR OUT`: one epoch of the distributed train loader
on every rank and the metric reduction (rank 0 writes what it saw as JSON to OUT); `one-step OUT`: one DDP
optimizer step on a split global batch (rank 0 saves the weights to OUT)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from fastcifar.config import DataConfig, ModelConfig
from fastcifar.custom_resnet import CustomResNet
from fastcifar.data import make_loaders
from fastcifar.distributed import from_env, gather, keep_until_exit, start, stop
from fastcifar.loop import PassStats
from fastcifar.training import _over_ranks
from tests.synthetic import decode_index


def one_step(out: str) -> None:
    """One DDP step on this rank's half of a fixed global batch of 64, batch norm in eval mode (so each image's
    gradient does not depend on the others in its batch); rank 0 saves the updated weights."""
    dist = from_env()
    cpu = torch.device("cpu")
    start(dist, cpu, 60)
    torch.manual_seed(0)
    model = CustomResNet(ModelConfig(widths=(8, 16, 32, 64))).eval()
    ddp = DistributedDataParallel(model)
    keep_until_exit(ddp)  # as the training command does: its destructor can abort or hang a gloo teardown
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    half = 64 // dist.world_size
    mine = slice(dist.rank * half, (dist.rank + 1) * half)
    torch.nn.functional.cross_entropy(ddp(x[mine]), y[mine]).backward()
    optimizer.step()
    if dist.is_main:
        torch.save(model.state_dict(), out)
    stop()


def main(data_dir: str, out: str) -> None:
    dist = from_env()
    cpu = torch.device("cpu")
    start(dist, cpu, 60)
    data = DataConfig(data_dir=data_dir, batch_size=32, test_batch_size=32, num_workers=1)
    loaders = make_loaders(data, cpu, seed=0, distributed=True)
    seen = []
    with loaders.train.epoch() as batches:
        for images, _ in batches:
            seen += decode_index(images.numpy()).tolist()
    # Rank-local numbers, then the reduction the training loop uses.
    local = PassStats(loss=0.5 + dist.rank, accuracy=(10 + dist.rank) / 40, images=40, seconds=1.0 + dist.rank)
    reduced = _over_ranks(local, dist, cpu)
    everyone = gather({"seen": seen, "local": [local.loss, local.accuracy, local.images, local.seconds]}, dist)
    if dist.is_main:
        Path(out).write_text(json.dumps({"ranks": everyone, "reduced": [reduced.loss, reduced.accuracy,
                                                                         reduced.images, reduced.seconds],
                                         "steps": len(loaders.train), "train_size": loaders.train_size}))
    stop()


if __name__ == "__main__":
    np.seterr(all="ignore")
    if sys.argv[1] == "one-step":
        one_step(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2])
    # Every file is written; skip the interpreter's teardown of gloo's threads, which under CPU contention
    # aborted a finished rank ("terminate called without an active exception"), like training.main does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
