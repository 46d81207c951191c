"""The physical picture: FLOPs of one training step of the model, and the machine's matmul peak."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastcifar.config import ModelConfig
from fastcifar.custom_resnet import CustomResNet


def training_step_flops(batch_size: int = 512, widths: tuple[int, int, int, int] = ModelConfig.widths) -> dict:
    """FLOPs (multiply and add counted separately) of forward and forward+backward for one batch, counted
    by PyTorch's FlopCounterMode (convolutions and matmuls; BN, ReLU, pooling are not counted and are a few %)
on a CPU run of a batch of 2, scaled linearly to `batch_size`."""
    model = CustomResNet(ModelConfig(widths=widths))
    x = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as total:
        model(x).sum().backward()
    scale = batch_size / 2
    return {"batch_size": batch_size, "forward": forward.get_total_flops() * scale,
            "train_step": total.get_total_flops() * scale}


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 4096, seconds: float = 2.0,
                min_calls: int = 3) -> float:
    """FLOP/s of a large square matmul in `dtype`: the practical compute ceiling. On a GPU the calls are queued
    back to back and timed with CUDA events (no sync per call). On a CPU it is the fastest of at least
    `min_calls` calls: one n=4096 fp32 call takes ~1.5 s on a 2-core VM, whose speed varied by 30% within minutes
    (BENCHMARKS.md, 2026-12-02), and a ceiling is the best the machine did, not its average."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        probe = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        count = max(1, int(seconds / max(time.perf_counter() - probe, 1e-6)))
        begin.record()
        for _ in range(count):
            a @ b
        end.record()
        end.synchronize()
        return 2 * n**3 * count / (begin.elapsed_time(end) / 1000)
    calls: list[float] = []
    start = time.perf_counter()
    while len(calls) < min_calls or time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        a @ b
        calls.append(time.perf_counter() - begin)
    return 2 * n**3 / min(calls)
