"""The one-cycle learning-rate policy as a piecewise-linear function of the optimizer step.

    lr(epoch t) = min_lr --linear--> max_lr at t = peak_epoch --linear--> min_lr at t = epochs

with t = step / steps_per_epoch, so the peak is reached at the end of epoch `peak_epoch` and the last
step of the run uses (nearly) min_lr, never less: there is no annihilation phase below min_lr (the spec).
`end_lr` (when given) replaces min_lr as the value reached at the end, e.g. 0 for an annihilating cycle.
"""

from __future__ import annotations

import numpy as np
import torch


def one_cycle_lr(step: int | np.ndarray, steps_per_epoch: int, epochs: int, peak_epoch: float,
                 min_lr: float, max_lr: float, end_lr: float | None = None) -> float | np.ndarray:
    """Learning rate at optimizer step `step` (0-based; scalars or arrays)."""
    t = np.asarray(step, dtype=np.float64) / steps_per_epoch
    end = min_lr if end_lr is None or end_lr < 0 else end_lr
    lr = np.interp(t, [0.0, peak_epoch, epochs], [min_lr, max_lr, end])
    return float(lr) if lr.ndim == 0 else lr


def make_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, peak_epoch: float,
                   min_lr: float, max_lr: float, end_lr: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler following `one_cycle_lr` (times a group's "lr_scale", where it has one).

    A LambdaLR (rather than a custom class) so that its state saves and loads like any scheduler's.
    """
    def factor(step: int) -> float:
        return one_cycle_lr(step, steps_per_epoch, epochs, peak_epoch, min_lr, max_lr, end_lr) / max_lr

    for group in optimizer.param_groups:
        group["lr"] = max_lr * group.get("lr_scale", 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
