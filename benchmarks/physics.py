"""The physical picture: FLOPs of one training step of the model, and the machine's matmul peak."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastcifar.config import ModelConfig
from fastcifar.custom_resnet import CustomResNet


def padding_share(side: int, kernel: int = 3, padding: int = 1) -> float:
    """The share of a stride-1, `kernel` x `kernel` convolution's products over a zero-padded `side` x `side` input
    that multiply the padding: at each output position only the taps over real pixels count. For a 3x3 kernel
    with padding 1 that is 1 - (3s - 2)^2 / (9s^2): 4% at 32x32, 16% at 8x8, 31% at 4x4."""
    taps = sum(min(i - padding + kernel - 1, side - 1) - max(i - padding, 0) + 1 for i in range(side))
    return 1 - taps**2 / (kernel**2 * side**2)


def training_step_flops(batch_size: int = 512, widths: tuple[int, int, int, int] = ModelConfig.widths) -> dict:
    """FLOPs (multiply and add counted separately) of forward and forward+backward for one batch, counted
    by PyTorch's FlopCounterMode (convolutions and matmuls; BN, ReLU, pooling are not counted and are a few %)
on a CPU run of a batch of 2, scaled linearly to `batch_size`.

    `train_step_padding`: the part of `train_step` that multiplies the 3x3 convolutions' zero padding. The counter
    counts those products, and a matmul formulation (im2col) computes them, but oneDNN's direct convolutions skip
    them, so the FLOPs that such a step computes are `train_step - train_step_padding` (86% of the count at the
    spec's widths, because the 4x4 and 8x8 layers hold a third of the FLOPs)."""
    model = CustomResNet(ModelConfig(widths=widths))
    x = torch.randn(2, 3, 32, 32)
    convs: list[tuple[float, float]] = []  # (FLOPs per pass, padding share) of each convolution
    hooks = [m.register_forward_hook(lambda m, args, out: convs.append(
        (2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1],
         padding_share(args[0].shape[-1], m.kernel_size[0], m.padding[0]))))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with FlopCounterMode(display=False) as forward:
        model(x)
    for hook in hooks:
        hook.remove()
    with FlopCounterMode(display=False) as total:
        model(x).sum().backward()
    # every convolution's three passes (forward, filter gradient, input gradient) have the same products, except
    # the first one's input gradient, which is not computed (the images need none)
    step = [(flops * (2 if i == 0 else 3), share) for i, (flops, share) in enumerate(convs)]
    scale = batch_size / 2
    return {"batch_size": batch_size, "forward": forward.get_total_flops() * scale,
            "train_step": total.get_total_flops() * scale,
            "train_step_padding": sum(flops * share for flops, share in step) * scale,
            "conv_train_step": sum(flops for flops, _ in step) * scale}


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
