"""Levers of the test pass, measured side by side: `no_grad` (what fastcifar.loop.test_pass uses) against
`inference_mode`, each with and without BatchNorm folded into the convolution it directly follows.

    python -m benchmarks.test_pass [--batch-size 1000] [--rounds 2]

Forward only, the spec's network in eval mode, channels_last, fp32, random weights and random BN statistics
(speed does not depend on their values). Only a conv -> BN pair can be folded: in the three pooled layers BN
follows the max-pool, and a negative BN scale does not commute with a max. Prints images/s per variant and
round (one view per image; flip TTA costs two).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from fastcifar import allocator
from fastcifar.config import ModelConfig
from fastcifar.custom_resnet import CustomResNet


def fold_batch_norm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` (eval mode) with every Conv2d -> BatchNorm2d pair inside a Sequential replaced by one
    Conv2d with a bias (and an Identity); returns the copy and the number of pairs folded."""
    model = copy.deepcopy(model).eval()
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[first], seq._modules[second]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True)
            with torch.no_grad():  # the folded weights are constants, not a graph back to the BN parameters
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                shift = bn.bias - bn.running_mean * scale
                fused.bias.copy_(shift if conv.bias is None else shift + conv.bias * scale)
            seq._modules[first] = fused.to(memory_format=torch.channels_last)
            seq._modules[second] = nn.Identity()
            folded += 1
    return model, folded


def images_per_s(model: nn.Module, x: torch.Tensor, mode: Callable[[], contextlib.AbstractContextManager],
                 repeats: int = 3) -> float:
    """The best of `repeats` timed forward passes of the batch `x` (after one untimed), in images/s."""
    with mode():
        model(x)
        best = float("inf")
        for _ in range(repeats):
            begin = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - begin)
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.test_pass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1000, help="test batch (fastcifar's default: 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all variants, in turn")
    args = parser.parse_args()
    model = random_model()
    folded, pairs = fold_batch_norm(model)
    x = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        diff = (model(x) - folded(x)).abs().max().item()
    print(f"allocator {allocator.describe()} | threads {torch.get_num_threads()} | batch {args.batch_size} | "
          f"{pairs} conv->BN pairs folded (largest logit difference {diff:.1e})")
    variants = {"no_grad": (torch.no_grad, model), "inference_mode": (torch.inference_mode, model),
                "no_grad + folded": (torch.no_grad, folded), "inference_mode + folded": (torch.inference_mode, folded)}
    for r in range(1, args.rounds + 1):
        for name, (mode, net) in variants.items():
            print(f"round {r}  {name:24s} {images_per_s(net, x, mode):7.1f} images/s")


if __name__ == "__main__":
    main()
