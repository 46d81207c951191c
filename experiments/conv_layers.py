"""Where the training step's convolution time goes: each convolution of the spec's network, its three passes
(forward, gradient of the input, gradient of the filters) timed one by one, against the machine's matmul peak.

    python -m experiments.conv_layers [--batch-size 512] [--dtype auto|bf16|fp32] [--repeats 3] [--out FILE]

The profile of a whole step (`python -m benchmarks.run --sections physics`) names `convolution_backward` as the
largest op; this says which layer and which of its two gradients is slow. Each pass runs as PyTorch runs it in
training (channels_last, the training precision, `aten.convolution_backward` with one output selected), plus the
filter gradient as fastcifar/conv.py computes it for the 4x4 layers (`run.conv_grad`): the 9 shifted copies of the
padded input side by side (an im2col in channels_last) and one matmul against the output gradient.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.physics import best_time, matmul_peak
from fastcifar import allocator
from fastcifar.calibrate import training_precision
from fastcifar.config import ModelConfig
from fastcifar.conv import conv3x3_backward, weight_grad_im2col
from fastcifar.custom_resnet import CustomResNet


def conv_shapes(widths: tuple[int, int, int, int] = ModelConfig.widths) -> list[tuple[str, int, int, int]]:
    """(name, input channels, output channels, side) of every Conv2d of the network, in forward order."""
    model = CustomResNet(ModelConfig(widths=widths))
    shapes: list[tuple[str, int, int, int]] = []
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: shapes.append(
        (name, m.in_channels, m.out_channels, args[0].shape[-1])))
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return shapes


def weight_grad_unfold(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same product with the shifted copies made by one `unfold` copy ([N*H*W, C_in*9], ordered channel by
    channel): the filter layout falls out directly, but the copy is a 6-d gather (tried; slower than the cat)."""
    n, c, h, w = x.shape
    cols = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).unfold(1, 3, 1).unfold(2, 3, 1).reshape(-1, c * 9)
    return (grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1]).t() @ cols).view(-1, c, 3, 3)


def weight_grad_shift(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """No copies of the input: both tensors zero-padded and flattened to rows, each of the 9 taps one matmul of
    two contiguous row ranges offset by the tap's shift. The padding rows cost (H+2)(W+2)/(HW) times the FLOPs
    (2.25x at 4x4); tried, slower than the cat except at 16x16 with 128 channels."""
    n, c, h, w = x.shape
    rows = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).reshape(-1, c)
    grads = F.pad(grad_out.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).reshape(-1, grad_out.shape[1])
    out = torch.empty(grad_out.shape[1], c, 3, 3, dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            shift = (i - 1) * (w + 2) + (j - 1)  # the input row that meets output row r is r + shift
            lo, hi = max(0, -shift), min(len(rows), len(rows) - shift)
            out[:, :, i, j] = grads[lo:hi].t() @ rows[lo + shift:hi + shift]
    return out


FORMULATIONS = {"im2col": weight_grad_im2col, "unfold": weight_grad_unfold, "shift": weight_grad_shift}


def time_layer(c_in: int, c_out: int, side: int, batch_size: int, dtype: torch.dtype, repeats: int,
               formulations: tuple[str, ...] = ("im2col",)) -> dict:
    """Seconds of each pass of one convolution; random data (speed does not depend on the values)."""
    x = torch.randn(batch_size, c_in, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(x, weight, padding=1)
    grad_out = torch.randn_like(out)

    def backward(mask: tuple[bool, bool]) -> Callable[[], object]:
        return lambda: conv3x3_backward(grad_out, x, weight, mask)

    times = {
        "forward": best_time(lambda: F.conv2d(x, weight, padding=1), repeats),
        "grad_input": best_time(backward((True, False)), repeats),
        "grad_weight": best_time(backward((False, True)), repeats),
    }
    for name in formulations:
        times[f"grad_weight_{name}"] = best_time(lambda f=FORMULATIONS[name]: f(grad_out, x), repeats)
    return {"flops_per_pass": 2 * batch_size * side * side * c_in * c_out * 9, "seconds": times}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conv_layers", description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 where the CPU has bf16 units (what --precision auto trains in), else fp32")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per pass; the fastest is kept")
    parser.add_argument("--formulations", default="im2col",
                        help=f"comma-separated filter-gradient formulations to time beside oneDNN's, of: "
                             f"{', '.join(FORMULATIONS)} (im2col: fastcifar/conv.py's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be at least 1")
    formulations = tuple(args.formulations.split(","))
    if unknown := [f for f in formulations if f not in FORMULATIONS]:
        parser.error(f"unknown formulation {unknown[0]!r}; choose from: {', '.join(FORMULATIONS)}")
    trained = training_precision(torch.device("cpu")) if args.dtype == "auto" else None
    name = args.dtype if trained is None else ("bf16" if trained == torch.bfloat16 else "fp32")
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    peak = matmul_peak(dtype, torch.device("cpu"))
    print(f"cpu, {torch.get_num_threads()} threads, {name}, allocator {allocator.describe()}, batch "
          f"{args.batch_size}; matmul peak {peak / 1e12:.2f} TFLOP/s (share of peak in brackets)")
    passes = ("forward", "grad_input", "grad_weight", *[f"grad_weight_{f}" for f in formulations])
    print(f"{'layer':<18} {'shape':<16}" + "".join(f"{p:>22}" for p in passes))
    rows, totals = [], dict.fromkeys(passes, 0.0)
    for layer, c_in, c_out, side in conv_shapes():
        row = time_layer(c_in, c_out, side, args.batch_size, dtype, args.repeats, formulations)
        cells = ""
        for p in passes:
            seconds = row["seconds"][p]
            totals[p] += seconds
            cells += f"{seconds * 1e3:>12.1f} ms ({row['flops_per_pass'] / seconds / peak:4.0%})"
        print(f"{layer:<18} {f'{c_in}->{c_out} @{side}':<16}{cells}", flush=True)
        rows.append({"layer": layer, "c_in": c_in, "c_out": c_out, "side": side, **row})
    print(f"{'total':<35}" + "".join(f"{totals[p] * 1e3:>12.1f} ms{'':>7}" for p in passes))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dtype": name, "batch_size": args.batch_size, "peak_flops": peak,
                                        "threads": torch.get_num_threads(), "layers": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
