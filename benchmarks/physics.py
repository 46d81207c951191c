"""The physical picture: FLOPs of one training step of the model, and the machine's matmul peak.

    python -m benchmarks.physics [--dtype auto|bf16|fp32] [--shapes 1024x1024x1024,...]

prints the rate of CPU matmuls of several shapes, each also as a 1x1 channels_last convolution (oneDNN's
convolution path with its own weight layout): how far the n=4096 "peak" is from the best GEMM the CPU runs. With
`ONEDNN_VERBOSE=1` oneDNN names the kernel and the layouts of each call.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastcifar.calibrate import training_precision
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


# (m, k, n) of [m, k] @ [k, n]: square ones, and the 4x4 layers' convolution as one GEMM ([N*16, 9*512] @ [9*512, 512])
GEMM_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 4608, 512), (8192, 512, 4608),
               (512, 8192, 4608))


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one untimed call (the benchmarks' one timing loop)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - begin)
    return best


def fastest_rate(fn: Callable[[], object], flops: float, calls: int = 5) -> float:
    """FLOP/s of the fastest of `calls` calls of `fn` (after one untimed)."""
    return flops / best_time(fn, calls)


def gemm_rates(dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...] = GEMM_SHAPES,
               calls: int = 5) -> list[dict]:
    """For each (m, k, n): the rate of `a @ b` on the CPU, and of the same product as a 1x1 convolution of a
    channels_last [1, k, m, 1] input with n filters."""
    rows = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        x = a.t().reshape(1, k, m, 1).contiguous(memory_format=torch.channels_last)
        w = b.t().reshape(n, k, 1, 1).contiguous(memory_format=torch.channels_last)
        flops = 2 * m * k * n
        rows.append({"m": m, "k": k, "n": n, "matmul": fastest_rate(partial(torch.matmul, a, b), flops, calls),
                     "conv1x1": fastest_rate(partial(torch.nn.functional.conv2d, x, w), flops, calls)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.physics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: what training picks on this CPU")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in GEMM_SHAPES),
                        help="comma-separated MxKxN")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per shape; the fastest is kept")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or training_precision(torch.device("cpu"))
    try:
        shapes = tuple(tuple(int(v) for v in text.split("x")) for text in args.shapes.split(","))
        if any(len(s) != 3 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        parser.error(f"--shapes {args.shapes!r}: expected MxKxN,... with positive sizes")
    print(f"cpu, {torch.get_num_threads()} threads, {str(dtype).removeprefix('torch.')}; GFLOP/s, fastest of "
          f"{args.calls} calls")
    for r in gemm_rates(dtype, shapes, args.calls):
        print(f"{r['m']:>6} x {r['k']:>5} x {r['n']:>5}   matmul {r['matmul'] / 1e9:7.1f}   "
              f"1x1 conv {r['conv1x1'] / 1e9:7.1f}", flush=True)


if __name__ == "__main__":
    main()
