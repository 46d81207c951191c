"""Levers of the test pass, measured side by side: `no_grad` (what fastcifar.loop.test_pass uses) against
`inference_mode`, each with and without BatchNorm folded into the convolution before it, and torch.compile of the
eval model (its compile time printed on its own).

    python -m benchmarks.test_pass [--batch-size 1000] [--rounds 2] [--dtype auto|bf16|fp32] [--compile]

Forward only, the spec's network in eval mode, channels_last, in the training precision under autocast as the
test pass runs it (`auto`: bf16 where the CPU has bf16 kernels), random weights and random BN statistics (speed
does not depend on their values). A conv -> BN pair always folds; in the three pooled layers (conv -> max-pool ->
BN) it folds when every channel's BN scale is positive, since a positive scale commutes with a max (in the `fast`
preset the BN weights are frozen at 1, so every scale is). Prints images/s per variant and round (one view per
image; flip TTA costs two).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.physics import best_time
from fastcifar import allocator
from fastcifar.calibrate import training_precision
from fastcifar.config import ModelConfig
from fastcifar.custom_resnet import CustomResNet
from fastcifar.runtime import compile_model


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One Conv2d with a bias computing bn(conv(x)) with BN's running statistics."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True)
    with torch.no_grad():  # the folded weights are constants, not a graph back to the BN parameters
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        shift = bn.bias - bn.running_mean * scale
        fused.bias.copy_(shift if conv.bias is None else shift + conv.bias * scale)
    return fused.to(memory_format=torch.channels_last)


def fold_batch_norm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` (eval mode) with every Conv2d -> BatchNorm2d pair inside a Sequential, and every
    Conv2d -> MaxPool2d -> BatchNorm2d whose BN scales are all positive, replaced by one Conv2d with a bias (the BN
    by an Identity); returns the copy and the number of BNs folded."""
    model = copy.deepcopy(model).eval()
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for i, first in enumerate(names):
            conv = seq._modules[first]
            if not isinstance(conv, nn.Conv2d) or i + 1 >= len(names):
                continue
            pooled = isinstance(seq._modules[names[i + 1]], nn.MaxPool2d)
            bn_name = names[i + 2] if pooled and i + 2 < len(names) else names[i + 1]
            bn = seq._modules[bn_name]
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            if pooled and not bool((bn.weight / torch.sqrt(bn.running_var + bn.eps) > 0).all()):
                continue  # a negative scale turns the max into a min: this BN cannot move before the pool
            seq._modules[first] = _fold_into(conv, bn)
            seq._modules[bn_name] = nn.Identity()
            folded += 1
    return model, folded


def images_per_s(model: nn.Module, x: torch.Tensor, mode: Callable[[], contextlib.AbstractContextManager],
                 repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """The best of `repeats` timed forward passes of the batch `x` (after one untimed), in images/s, under
    autocast to `dtype` (none for fp32)."""
    with mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        best = best_time(lambda: model(x), repeats)
    return x.shape[0] / best


def random_model(widths: tuple[int, int, int, int] = ModelConfig.widths) -> nn.Module:
    """The network in eval mode with BN statistics and affine parameters drawn at random (seeded)."""
    torch.manual_seed(0)
    model = CustomResNet(ModelConfig(widths=widths)).eval().to(memory_format=torch.channels_last)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.test_pass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1000, help="test batch (fastcifar's default: 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all variants, in turn")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="autocast precision (auto: what training picks on this CPU)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eval model")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or training_precision(torch.device("cpu"))
    model = random_model()
    folded, pairs = fold_batch_norm(model)
    x = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        diff = (model(x) - folded(x)).abs().max().item()
    print(f"allocator {allocator.describe()} | threads {torch.get_num_threads()} | batch {args.batch_size} | "
          f"{str(dtype).removeprefix('torch.')} | {pairs} BNs folded (largest fp32 logit difference {diff:.1e})")
    variants = {"no_grad": (torch.no_grad, model), "inference_mode": (torch.inference_mode, model),
                "no_grad + folded": (torch.no_grad, folded), "inference_mode + folded": (torch.inference_mode, folded)}
    if args.compile:
        for name, net in (("no_grad + compiled", model), ("no_grad + folded + compiled", folded)):
            compiled = compile_model(net)
            begin = time.perf_counter()
            images_per_s(compiled, x, torch.no_grad, repeats=1, dtype=dtype)  # compiles
            print(f"{name}: compiled and ran twice in {time.perf_counter() - begin:.1f} s")
            variants[name] = (torch.no_grad, compiled)
    for r in range(1, args.rounds + 1):
        for name, (mode, net) in variants.items():
            print(f"round {r}  {name:28s} {images_per_s(net, x, mode, dtype=dtype):7.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
