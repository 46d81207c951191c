"""Exponential moving average (EMA) of a model's weights, for testing with smoother weights.

After every optimizer step: ema = decay * ema + (1 - decay) * weights, for the parameters and for the
BatchNorm running statistics (so the averaged weights are tested with statistics that match them; the
integer batch counters are copied). Early in training an average over the random initial weights would
be useless, so the decay warms up as min(decay, (1 + t) / (10 + t)) at update t (as timm's EMA does).

The averaged copy is a plain module of the same class: its state_dict loads into a fresh model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses (warmed up over the first updates)."""
        t = self.updates
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights and statistics (one fused pass, no host sync)."""
        weight = 1.0 - self.current_decay()
        averaged, current = [], []
        for mine, theirs in zip(self._tensors(self.module).values(), self._tensors(model).values(), strict=True):
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs.detach())
            else:
                mine.copy_(theirs)  # num_batches_tracked
        torch._foreach_lerp_(averaged, current, weight)
        self.updates += 1

    @staticmethod
    def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
        return dict(model.named_parameters()) | dict(model.named_buffers())

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
