"""Why whole-network gradient comparisons through ReLUs need a margin, measured: the fused BatchNorm + ReLU kernel
and eager BatchNorm2d + ReLU, both in fp32, each against an fp64 eager run of the same weights and batch.

    python -m benchmarks.relu_kink [--threads 1] [--seed 0] [--batch 16] [--bias-offset 0]

The network is the narrow one the kernel's tests use (widths 8,16,16,32), the loss sum(logits^2). For each fp32 way it
prints the largest gradient error (max |difference| over the parameter's max |gradient|, worst parameter), and how
many pre-activations it puts on the other side of zero from fp64 (a ReLU decision flipped by rounding: that element's
gradient then changes by its whole size). Also the kink margin: the smallest |pre-activation| of the eager fp32 run.
`--bias-offset 2.5` sets every BatchNorm bias to +/-2.5 by channel, as the network tests do to keep away from zero.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from benchmarks.fused_bn_relu import fuse_bn_relu
from fastcifar.config import ModelConfig
from fastcifar.custom_resnet import CustomResNet

WIDTHS = (8, 16, 16, 32)


def narrow_network(seed: int, bias_offset: float = 0.0, **overrides: object) -> CustomResNet:
    """The narrow network with seed `seed`; with `bias_offset`, every BatchNorm bias +/-offset by channel (half the
    ReLUs then mostly pass, half mostly block, and pre-activations stay away from zero)."""
    torch.manual_seed(seed)
    model = CustomResNet(ModelConfig(widths=WIDTHS, **overrides))
    if bias_offset:
        with torch.no_grad():
            for bn in [m for m in model.modules() if type(m) is nn.BatchNorm2d]:
                bn.bias.copy_(torch.tensor([bias_offset, -bias_offset]).repeat(bn.num_features // 2))
    return model


def record_kink_margin(model: nn.Module) -> list[float]:
    """The smallest |pre-activation| of each BatchNorm2d call of an unfused `model`, appended as it runs."""
    margins: list[float] = []
    for bn in [m for m in model.modules() if type(m) is nn.BatchNorm2d]:
        bn.register_forward_hook(lambda _m, _i, out: margins.append(out.detach().abs().min().item()))
    return margins


def _run(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(each parameter's gradient, each BatchNorm's ReLU decisions) of one forward + backward; the decisions are
    read from the BatchNorm's output, before the ReLU unfused and after it fused (positive either way)."""
    masks: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: masks.append(out.detach() > 0))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model(x).square().sum().backward()
    for hook in hooks:
        hook.remove()
    return [p.grad.double() for p in model.parameters()], masks


def compare(seed: int = 0, batch: int = 16, bias_offset: float = 0.0) -> dict:
    """The gradient errors, flipped ReLU decisions and kink margin described above, on torch's current threads."""
    eager = narrow_network(seed, bias_offset).to(memory_format=torch.channels_last)
    fused, exact = copy.deepcopy(eager), copy.deepcopy(eager).double()
    fuse_bn_relu(fused)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    margins = record_kink_margin(eager)
    truth, truth_masks = _run(exact, x.double())
    out = {"threads": torch.get_num_threads(), "seed": seed, "batch": batch, "bias_offset": bias_offset}
    for name, model in (("eager", eager), ("fused", fused)):
        grads, masks = _run(model, x)
        errors = [((g - t).abs().max() / t.abs().max()).item() for g, t in zip(grads, truth, strict=True)]
        out[f"{name}_error"] = max(errors)
        out[f"{name}_flips"] = sum(int((m != t).sum()) for m, t in zip(masks, truth_masks, strict=True))
    out["margin"] = min(margins)
    out["pre_activations"] = sum(m.numel() for m in truth_masks)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relu_kink", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="the network's and the batch's seed")
    parser.add_argument("--batch", type=int, default=16, help="images in the batch")
    parser.add_argument("--bias-offset", type=float, default=0.0, help="BatchNorm biases +/- this by channel")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.batch < 2:
        parser.error("--threads must be >= 1 and --batch >= 2")
    torch.set_num_threads(args.threads)
    r = compare(args.seed, args.batch, args.bias_offset)
    print(f"{r['threads']} thread(s), seed {r['seed']}, batch {r['batch']}, bias offset {r['bias_offset']}: "
          f"{r['pre_activations']} pre-activations, kink margin {r['margin']:.1e}")
    for name in ("eager", "fused"):
        print(f"{name} fp32 against fp64: gradient error {r[f'{name}_error']:.1e} of scale, "
              f"{r[f'{name}_flips']} ReLU decision(s) flipped")


if __name__ == "__main__":
    main()
