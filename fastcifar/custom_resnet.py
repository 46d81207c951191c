"""The custom ResNet of the spec (6,573,120 parameters at the default widths).

    prep    Conv3x3 -> BN -> ReLU                                         [64]
    layer1  X = Conv3x3 -> MaxPool2 -> BN -> ReLU; out = X + ResBlock(X)   [128]
    layer2  Conv3x3 -> MaxPool2 -> BN -> ReLU                             [256]
    layer3  X = Conv3x3 -> MaxPool2 -> BN -> ReLU; out = X + ResBlock(X)   [512]
    head    MaxPool(4) -> flatten -> Linear(512, 10)  -> logits (softmax: `predict_proba`)

The head's max-pool spans the whole 4x4 map of a 32x32 image (`GlobalMaxPool`: the same op, MaxPool2d(4), at
32x32), so that the network also takes the smaller images of progressive resizing (`data.low_res_size`).

ResBlock = (Conv3x3 -> BN -> ReLU) x 2. Convolutions and the linear layer have no bias (every conv
is followed by BN, which has its own shift). `python -m fastcifar.custom_resnet` prints a summary.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from fastcifar.config import ModelConfig


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from groups of `ghost_batch` images (ghost batch norm, Hoffer
    et al. 2017; Page used groups of 32 in a batch of 512): each group is normalised by its own mean and
    variance, which adds noise to the statistics, a regulariser at large batches. The running statistics move
    once per batch, by the mean of the groups' statistics; evaluation is plain BatchNorm2d, and the parameters,
    buffers and state_dict are BatchNorm2d's."""

    def __init__(self, num_features: int, ghost_batch: int, momentum: float = 0.1) -> None:
        super().__init__(num_features, momentum=momentum)
        self.ghost_batch = ghost_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_batch:
            return super().forward(x)
        groups = x.split(self.ghost_batch)  # views: each group of a channels_last batch is channels_last too
        # Every group updates its own copy of the running statistics from the same start. The update is linear
        # in the batch statistics, so the mean of the copies is one update by the mean of the groups' statistics.
        means = self.running_mean.repeat(len(groups), 1)
        variances = self.running_var.repeat(len(groups), 1)
        out = torch.cat([nn.functional.batch_norm(g, means[i], variances[i], self.weight, self.bias, True,
                                                  self.momentum, self.eps) for i, g in enumerate(groups)])
        with torch.no_grad():
            self.running_mean.copy_(means.mean(0))
            self.running_var.copy_(variances.mean(0))
            self.num_batches_tracked.add_(1)
        return out


def batch_norm(channels: int, bn_momentum: float = 0.1, ghost_batch: int = 0) -> nn.BatchNorm2d:
    """BatchNorm2d, or its ghost variant when `ghost_batch` > 0."""
    if ghost_batch:
        return GhostBatchNorm2d(channels, ghost_batch, momentum=bn_momentum)
    return nn.BatchNorm2d(channels, momentum=bn_momentum)


Norm = Callable[[int], nn.BatchNorm2d]  # channels -> the BatchNorm after a conv (`batch_norm`, set by the config)


def conv_bn(c_in: int, c_out: int, norm: Norm = nn.BatchNorm2d, pool: bool = False) -> nn.Sequential:
    """Conv3x3 (stride 1, pad 1, no bias) [-> MaxPool2d(2)] -> norm(c_out) -> ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [norm(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Two conv-bn-relu units; the caller adds the skip connection."""

    def __init__(self, channels: int, norm: Norm = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv_bn(channels, channels, norm)
        self.conv2 = conv_bn(channels, channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class Residual(nn.Module):
    """X = conv_bn_pool(x); returns X + ResBlock(X)."""

    def __init__(self, c_in: int, c_out: int, norm: Norm = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv_bn(c_in, c_out, norm, pool=True)
        self.res = ResBlock(c_out, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x + self.res(x)


class GlobalMaxPool(nn.Module):
    """Max over each channel's whole map: MaxPool2d(4) on the 4x4 map of a 32x32 image (the same kernel, so the
    same values and gradients bit for bit), MaxPool2d(3) on the 3x3 map of a 24x24 or 28x28 one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(x, kernel_size=x.shape[-2:])


class CustomResNet(nn.Module):
    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = config or ModelConfig()
        w0, w1, w2, w3 = cfg.widths
        norm = partial(batch_norm, bn_momentum=cfg.bn_momentum, ghost_batch=cfg.ghost_batch)
        self.prep = conv_bn(3, w0, norm)
        self.layer1 = Residual(w0, w1, norm)
        self.layer2 = conv_bn(w1, w2, norm, pool=True)
        self.layer3 = Residual(w2, w3, norm)
        self.pool = GlobalMaxPool()
        self.fc = nn.Linear(w3, cfg.num_classes, bias=False)
        self.logit_scale = cfg.logit_scale
        if cfg.dirac_init:
            dirac_init(self)
        if cfg.bn_weight_frozen:
            freeze_bn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 3, 32, 32] (or smaller, down to 8x8); CrossEntropyLoss applies
        log-softmax."""
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        logits = self.fc(torch.flatten(self.pool(x), 1))
        return logits if self.logit_scale == 1.0 else logits * self.logit_scale

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """The spec's final SoftMax: class probabilities [N, num_classes], each row summing to 1."""
        return torch.softmax(self(x).float(), dim=1)


def whitening_filters(images: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """3x3 filters that whiten the 3x3 patches of `images` ([N, 3, H, W], normalised floats): one per
    principal direction of the patch covariance, largest first, scaled by 1/sqrt(eigenvalue + eps).
    Returns [27, 3, 3, 3] (a conv weight: the unfold order is channel, row, column)."""
    patches = nn.functional.unfold(images.float(), kernel_size=3).transpose(1, 2).reshape(-1, 27).double()
    cov = torch.cov(patches.T)
    eigenvalues, vectors = torch.linalg.eigh(cov)  # ascending
    order = eigenvalues.argsort(descending=True)
    filters = vectors[:, order].T / (eigenvalues[order].clamp(min=0) + eps).sqrt()[:, None]
    return filters.reshape(27, 3, 3, 3).float()


@torch.no_grad()
def whiten_init(model: CustomResNet, images: torch.Tensor) -> int:
    """Set the prep conv's first filters to +/- the whitening filters of `images` (each direction twice,
    with both signs, because a ReLU follows); the other filters keep their random initialisation.
    Returns how many filters were set."""
    weight = model.prep[0].weight
    k = min(27, weight.shape[0] // 2)
    filters = whitening_filters(images)[:k].to(weight.device, weight.dtype)
    weight[: 2 * k] = torch.cat([filters, -filters])
    return 2 * k


@torch.no_grad()
def dirac_init(model: CustomResNet) -> int:
    """Partial-identity initialisation: in every conv after the prep layer, the first `c_in` output channels
    start as the identity (a 3x3 kernel with a 1 in its centre on channel i for output i); the others keep
    their random initialisation. A convolution with as many outputs as inputs (the residual blocks) starts
    as the identity, so at initialisation each block passes its input on (airbench's "dirac" init). Returns
    how many convolutions were set."""
    convs = [m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and not name.startswith("prep")]
    for conv in convs:
        c_out, c_in = conv.weight.shape[:2]
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return len(convs)


def freeze_bn_weights(model: nn.Module) -> None:
    """Keep every BatchNorm scale at its initial 1 (not trained; the biases still are): Page's and airbench's
    "frozen BN scales". The parameters stay in the model (and its state_dict and parameter count)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            m.weight.requires_grad_(False)


def freeze_prep_conv(model: CustomResNet) -> None:
    """Stop training the prep conv's filters (after the whitening init: a fixed whitening layer)."""
    model.prep[0].weight.requires_grad_(False)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """The network's size (6,573,120 for the spec), frozen parameters included unless `trainable_only`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def summary(model: nn.Module, batch_size: int = 1) -> str:
    """Per-layer output shapes and parameter counts, ending with the total: torchinfo's table where torchinfo
    is installed, else a plain table of the parameters (no shapes)."""
    try:
        from torchinfo import summary as torchinfo_summary  # only needed here; keeps import light
    except ImportError:
        return plain_summary(model)
    stats = torchinfo_summary(
        model, input_size=(batch_size, 3, 32, 32), verbose=0, device="cpu",
        col_names=("output_size", "num_params"), row_settings=("var_names",),
    )
    return str(stats)


def plain_summary(model: nn.Module) -> str:
    """One row per parameter tensor (name, shape, count, trainable), then the totals."""
    rows = [f"{'parameter':<32} {'shape':<22} {'count':>10}  trainable"]
    for name, p in model.named_parameters():
        rows.append(f"{name:<32} {str(tuple(p.shape)):<22} {p.numel():>10,}  {'yes' if p.requires_grad else 'no'}")
    rows.append(f"Total params: {count_parameters(model):,} (trainable: {count_parameters(model, True):,})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    from fastcifar.cli import Parser

    parser = Parser(prog="python -m fastcifar.custom_resnet",
                    description="Print the network's layer-by-layer summary (6,573,120 parameters at the spec's "
                                "widths).")
    parser.add_argument("--widths", default="64,128,256,512", help="channels of prep, layer1-3 (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        parser.error(f"--widths takes 4 integers separated by commas, got {args.widths!r}")
    if len(widths) != 4 or min(widths) < 1:
        parser.error(f"--widths takes 4 positive integers, got {args.widths!r}")
    print(summary(CustomResNet(ModelConfig(widths=widths))))


if __name__ == "__main__":
    main()
