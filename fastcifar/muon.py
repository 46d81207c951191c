"""Muon for the convolution filters, SGD for everything else, in one optimizer.

Muon (Keller Jordan, 2024; `torch.optim.Muon` since torch 2.9) replaces each weight matrix's momentum update
by its nearest semi-orthogonal matrix, found with a few Newton-Schulz iterations: every direction of the
update then moves by about the same amount, whatever the gradient's spectrum. torch.optim.Muon only takes
2-D parameters; a conv filter [out, in, 3, 3] is treated here as the matrix [out, in * 9] (as airbench94_muon
does), so the network and its state_dict stay exactly as they are.

Two more things follow airbench94_muon: the Newton-Schulz iteration runs in the filters' own dtype unless
told otherwise (torch's casts to bf16, which is ~16x slower than fp32 on a CPU without bf16 units), and each
Muon filter is rescaled to a fixed norm (sqrt(out)) before its step. Every conv here feeds a BatchNorm, so
the filter's scale does not change the network's function; fixing it keeps the step size relative, and
replaces weight decay for those parameters (their groups get none).

Groups with `"muon": False` take plain SGD steps with PyTorch's exact rule (momentum buffer = the first
gradient, then buf = momentum * buf + grad; Nesterov: grad + momentum * buf; weight decay added to the
gradient), so `--optim.optimizer muon` changes only the filters' updates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# The quintic iteration's coefficients (Jordan's, the same as torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with `matrix`'s singular vectors (singular values pushed
    into roughly [0.7, 1.2]) by `steps` Newton-Schulz iterations; computed in `dtype` (default: the input's)."""
    if matrix.ndim != 2:
        raise ValueError(f"orthogonalize takes a 2-D matrix, got shape {tuple(matrix.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype or matrix.dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: X @ X.T is then the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Muon steps for the groups marked `"muon": True` (parameters of 2 or more dimensions, flattened to
    [shape[0], -1]), SGD steps for the others. Per-group keys: lr, momentum, nesterov, weight_decay, muon."""

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(f"invalid MuonSGD settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"ns_steps={ns_steps}")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "muon": False}
        super().__init__(params, defaults)
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices or conv filters only (parameters of >= 2 dimensions)")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102 (torch's Optimizer.step contract)
        if closure is not None:
            raise ValueError("MuonSGD does not take a closure")
        for group in self.param_groups:
            lr, momentum, nesterov, wd = group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if wd and not group["muon"]:
                    grad = grad.add(p, alpha=wd)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    buf = state["momentum_buffer"] = grad.clone()
                else:
                    buf = state["momentum_buffer"].mul_(momentum).add_(grad)
                update = grad.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    p.mul_(p.shape[0] ** 0.5 / p.norm().clamp(min=1e-12))  # fixed filter norm (no host sync)
                    update = orthogonalize(update.reshape(p.shape[0], -1), self.ns_steps,
                                           dtype=self.ns_dtype).view_as(p)
                p.add_(update, alpha=-lr)
