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


class Lookahead:
    """Lookahead with a growing pull (airbench's schedule): every `every` steps the slow copy moves towards
    the trained weights, slow = lerp(slow, weights, 1 - decay), and the trained weights jump back to it
    (weights := slow). decay = base_decay * progress**3 grows from 0 (plain training early on) to
    `base_decay` at the end of the run, where `finish` puts the slow weights in place for good. Parameters
    and BatchNorm running statistics are both averaged; integer counters are left alone."""

    def __init__(self, model: nn.Module, every: int = 5, base_decay: float = 0.95 ** 5) -> None:
        if every < 1 or not 0 < base_decay < 1:
            raise ValueError(f"lookahead needs every >= 1 and base_decay in (0, 1), got {every}, {base_decay}")
        self.every, self.base_decay = every, base_decay
        self.slow = [t.detach().clone() for t in self._floats(model)]

    @staticmethod
    def _floats(model: nn.Module) -> list[torch.Tensor]:
        tensors = list(model.parameters()) + list(model.buffers())
        return [t for t in tensors if t.is_floating_point()]

    def decay(self, progress: float) -> float:
        return self.base_decay * min(max(progress, 0.0), 1.0) ** 3

    @torch.no_grad()
    def step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Call after optimizer step number `step` (1-based, counted over the whole run)."""
        if step % self.every == 0:
            self._pull(model, 1.0 - self.decay(step / total_steps))

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """The end of training: the slow weights become the model's."""
        self._pull(model, 0.0)

    def _pull(self, model: nn.Module, weight: float) -> None:
        fast = [t.detach() for t in self._floats(model)]
        if weight > 0:
            torch._foreach_lerp_(self.slow, fast, weight)
        torch._foreach_copy_(fast, self.slow)

    def state_dict(self) -> dict:
        return {"slow": list(self.slow), "every": self.every, "base_decay": self.base_decay}

    def load_state_dict(self, state: dict) -> None:
        torch._foreach_copy_(self.slow, list(state["slow"]))
        self.every, self.base_decay = int(state["every"]), float(state["base_decay"])
