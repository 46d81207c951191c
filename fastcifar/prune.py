"""Skipping easy examples (InfoBatch, Qin et al., ICLR 2024): less work per epoch, the same expected gradient.

Every training step records each example's loss (from the forward it already does, so the scores cost nothing).
At the start of a pruned epoch, the examples whose last loss is below the mean are "well learned"; a random
`fraction` of them is left out of that epoch. The ones kept from that group have their loss scaled by
1 / (1 - fraction), so that the epoch's gradient is an unbiased estimate of the full one. The first epoch (no
losses yet) and the epochs after `epochs` pruned ones (InfoBatch's annealing: the end of the schedule sees every
image) are full.

An epoch row's train_loss is then the mean of the weighted losses its steps minimised; its image count (and
results.json's train_images) counts the images actually trained.

The epoch's kept set is a pure function of the seed, the epoch and the losses at its start, and it is saved in
the checkpoint with the losses, so a run resumed in the middle of a pruned epoch replays the same batches.
Only the resident loader can leave examples out (it gathers batches by index); FFCV reads whole betons. On a GPU
under torch.compile, a pruned epoch's last, partial batch is a batch size the warm-up did not see: it costs one
more compilation (dynamo then treats the batch dimension as dynamic), not measured here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fastcifar.data import ResidentLoader

# The examples and their weights per batch: uint8 images, int64 labels, int64 dataset indices.
IndexedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class EasyPruner:
    """Per-example losses and, for each epoch, which examples it trains on and with what loss weight."""

    def __init__(self, size: int, fraction: float, epochs: int, seed: int, device: torch.device) -> None:
        if not 0 <= fraction < 1:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        self.size, self.fraction, self.epochs, self.seed = size, fraction, epochs, seed
        self.scores = torch.zeros(size, dtype=torch.float32, device=device)  # each example's last training loss
        self.keep = torch.ones(size, dtype=torch.bool, device=device)
        self.weights = torch.ones(size, dtype=torch.float32, device=device)
        self.planned: int | None = None  # the epoch (0-based) that keep/weights belong to

    def prunes(self, index: int) -> bool:
        """Whether epoch `index` (0-based) leaves easy examples out: the 2nd to the (epochs+1)-th."""
        return self.fraction > 0 and 1 <= index <= self.epochs

    def plan(self, index: int) -> None:
        """Choose epoch `index`'s examples from the losses so far; a no-op when it is already planned (a resumed
        epoch keeps the set it started with, whatever losses its first half recorded)."""
        if self.planned == index:
            return
        self.keep.fill_(True)
        self.weights.fill_(1.0)
        if self.prunes(index):
            easy = self.scores < self.scores.mean()
            generator = torch.Generator(device=self.scores.device)
            generator.manual_seed(self.seed * 1_000_003 + 500_009 + index)  # apart from the loader's order stream
            drop = easy & (torch.rand(self.size, generator=generator, device=self.scores.device) < self.fraction)
            self.keep = ~drop
            self.weights = torch.where(easy & self.keep, 1.0 / (1.0 - self.fraction), 1.0)
        self.planned = index

    def kept(self) -> int:
        """Examples in the planned epoch (a sync point on a GPU)."""
        return int(self.keep.sum())

    def record(self, index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """The batch's per-example losses as its examples' scores (plain cross-entropy, no smoothing: a ranking)."""
        with torch.no_grad():
            self.scores[index] = F.cross_entropy(logits.detach().float(), labels, reduction="none")

    def state_dict(self) -> dict:
        return {"scores": self.scores.cpu(), "keep": self.keep.cpu(), "weights": self.weights.cpu(),
                "planned": self.planned}

    def load_state_dict(self, state: dict) -> None:
        device = self.scores.device
        for name in ("scores", "keep", "weights"):
            value = state[name]
            if not isinstance(value, torch.Tensor) or value.shape != (self.size,):
                raise ValueError(f"the saved pruning state's {name} is not a tensor of {self.size} values")
            setattr(self, name, value.to(device))
        self.planned = state["planned"]


class PrunedLoader:
    """A ResidentLoader whose epochs leave out what `pruner` planned; batches carry their dataset indices. The
    order is the base loader's permutation for the epoch, filtered: the batches of a full epoch are the base's."""

    def __init__(self, base: ResidentLoader, pruner: EasyPruner) -> None:
        if base.world_size > 1:
            raise ValueError("pruning runs in one process (each rank would need every example's loss)")
        self.base, self.pruner = base, pruner
        self.images = base.images
        self.batch_size = base.batch_size

    def __len__(self) -> int:
        """Batches in the planned epoch (all of the base's before any is planned)."""
        kept = self.pruner.kept() if self.pruner.planned is not None else self.images
        return math.ceil(kept / self.batch_size)

    @contextlib.contextmanager
    def epoch(self, index: int = 0, skip: int = 0) -> Iterator[Iterator[IndexedBatch]]:
        self.pruner.plan(index)
        order = self.base.order(index)
        yield self._batches(order[self.pruner.keep[order]], skip)

    def _batches(self, order: torch.Tensor, skip: int) -> Iterator[IndexedBatch]:
        for start in range(skip * self.batch_size, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield *self.base.gather(index), index
