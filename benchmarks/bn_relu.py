"""The elementwise work between the convolutions, eager against torch.compile and a hand-written fused kernel:
every (max-pool +) BatchNorm + ReLU of the spec's network, forward and backward in training mode, timed on its own.

    python -m benchmarks.bn_relu [--batch-size 512] [--dtype auto|bf16|fp32] [--threads 0] [--repeats 5]
                                 [--ways eager,compiled,fused] [--out FILE]

Why it exists: a compiled region that fuses BN + ReLU (+ pool), forward and backward, is the obvious way to cut
the ~20-30% of a CPU step that these memory-bound ops take (issue 20), and torch.compile of the whole step was
slower than eager on the AMX Xeon. This times that region alone, so the answer does not depend on what Inductor
does with the convolutions. `fused` is benchmarks.fused_bn_relu's C++ kernel (BN + ReLU as one op; the pool stays
ATen's). Each block runs as the network runs it: channels_last, the training precision, the
BatchNorm scales frozen (as the `fast` candidates train them; their biases still get gradients), ReLU in place.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from benchmarks.fused_bn_relu import fuse_bn_relu
from benchmarks.physics import best_time
from fastcifar import allocator
from fastcifar.config import ModelConfig
from fastcifar.custom_resnet import CustomResNet
from fastcifar.runtime import cpu_has_fast_bf16

WAYS = ("eager", "compiled", "fused")


def block_shapes(widths: tuple[int, int, int, int] = ModelConfig.widths) -> list[tuple[str, int, int, bool]]:
    """(BatchNorm's name, channels, side of the block's input, whether a 2x2 max-pool comes first) for every
    BatchNorm2d of the network, in forward order."""
    model = CustomResNet(ModelConfig(widths=widths))
    pooled = {f"{parent}.{i + 1}" if parent else str(i + 1)
              for parent, seq in model.named_modules() if isinstance(seq, nn.Sequential)
              for i, m in enumerate(seq) if isinstance(m, nn.MaxPool2d)}
    shapes: list[tuple[str, int, int, bool]] = []
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: shapes.append(
        (name, m.num_features, args[0].shape[-1] * (2 if name in pooled else 1), name in pooled)))
        for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return shapes


def make_block(channels: int, pool: bool) -> nn.Module:
    """[MaxPool2d(2)] + BatchNorm2d (scale frozen) + ReLU(inplace), channels_last, in training mode."""
    block = nn.Sequential(*([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
    block[-2].weight.requires_grad_(False)
    return block.to(memory_format=torch.channels_last).train()


def time_block(block: nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> float:
    """Fastest forward + backward of `repeats` (after 2 untimed calls, the first of which compiles), in seconds."""
    def step() -> None:
        block(x).backward(grad)

    step()
    return best_time(step, repeats)  # one more untimed call, then the timed ones


def measure(batch_size: int, dtype: torch.dtype, repeats: int, ways: tuple[str, ...],
            shapes: list[tuple[str, int, int, bool]] | None = None) -> list[dict]:
    """One row per BatchNorm of the network: its shape and each way's milliseconds (ways timed one after the
    other on the same tensors, block by block, so that a drift in the machine's speed hits both alike)."""
    rows = []
    for name, channels, side, pool in shapes if shapes is not None else block_shapes():
        out_side = side // 2 if pool else side
        x = torch.randn(batch_size, channels, side, side).to(dtype).to(memory_format=torch.channels_last)
        grad = torch.randn(batch_size, channels, out_side, out_side).to(dtype).to(memory_format=torch.channels_last)
        row = {"bn": name, "channels": channels, "side": side, "pool": pool}
        for way in ways:
            block = make_block(channels, pool)
            if way == "compiled":
                block = torch.compile(block)
            elif way == "fused":
                fuse_bn_relu(block)
            row[f"{way}_ms"] = 1e3 * time_block(block, x.requires_grad_(), grad, repeats)
        rows.append(row)
    return rows


def markdown(rows: list[dict], ways: tuple[str, ...]) -> str:
    """The table: each way's milliseconds, then eager's time over each other way's (above 1: faster than eager)."""
    others = [w for w in ways if w != "eager"] if "eager" in ways else []
    lines = ["| BatchNorm | block | " + " | ".join([*ways, *(f"eager / {w}" for w in others)]) + " |",
             "|---|---|" + "---:|" * (len(ways) + len(others))]
    total = {"bn": "total", "channels": "", "side": "", "pool": False,
             **{f"{w}_ms": sum(r[f"{w}_ms"] for r in rows) for w in ways}}
    for r in [*rows, total]:
        shape = f"{'pool + ' if r['pool'] else ''}BN + ReLU, {r['channels']} @ {r['side']}" if r["channels"] else ""
        cells = [f"{r[f'{w}_ms']:.1f} ms" for w in ways]
        cells += [f"{r['eager_ms'] / r[f'{w}_ms']:.2f}x" for w in others]
        lines.append(f"| {r['bn']} | {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bn_relu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=512, help="images per block call (the training batch)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="activations' dtype; auto = bf16 where the CPU has fast bf16 units, else fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per block and way (the fastest counts)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of: {', '.join(WAYS)}")
    parser.add_argument("--out", type=Path, help="also write the rows and settings as JSON here")
    args = parser.parse_args(argv)
    ways = tuple(w for w in args.ways.split(",") if w)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be at least 1")
    if not ways or set(ways) - set(WAYS):
        parser.error(f"--ways takes a comma-separated list of {', '.join(WAYS)}, got {args.ways!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" or args.dtype == "auto" and cpu_has_fast_bf16() else torch.float32
    rows = measure(args.batch_size, dtype, args.repeats, ways)
    settings = {"batch_size": args.batch_size, "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "allocator": allocator.describe(), "torch": torch.__version__}
    print(json.dumps(settings))
    print(markdown(rows, ways))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
