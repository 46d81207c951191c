"""The filter gradient of the small-image 3x3 convolutions as one matmul (im2col), where oneDNN's is slow.

`python -m experiments.conv_layers` times each convolution of the network pass by pass. On the 2-core AMX Xeon in
bf16 (BENCHMARKS.md) oneDNN computes most of them at or near the matmul peak, except the filter gradient of the two
convolutions at 4x4 (layer3's residual block, 512 -> 512 channels): ~148 ms each, 12% of the peak, 3.7x slower
than the same product written as one matmul (~40 ms, 44%). At 4x4 the shifted copies of the input that the matmul
needs are small (75 MB in bf16 at batch 512), so building them costs less than the matmul it saves. At 8x8 the two
ways tie, and at 16x16 and 32x32 oneDNN is 2-5x faster, so the matmul is used only up to `max_side`.

Only the backward pass changes: the forward convolution and the input gradient stay oneDNN's, and the parameters,
their names and the state dict are those of `nn.Conv2d` (the class swap adds no state), so checkpoints and models
load either way. The two filter gradients differ by rounding only (both are sums of the same products; the order
differs): `tests/test_conv.py` compares them in fp32 and compares the first steps' losses in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The largest input side at which the matmul beats oneDNN's filter gradient (measured: 4; at 8 they tie).
MAX_SIDE = 4


def conv3x3_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     mask: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The library's own (input, filter) gradients of conv2d(x, weight, padding=1), each only where `mask` asks."""
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [*mask, False])
    return grad_x, grad_w


def weight_grad_im2col(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The filter gradient [C_out, C_in, 3, 3] of a 3x3, stride 1, pad 1 convolution of `x` [N, C_in, H, W] whose
    output gradient is `grad_out` [N, C_out, H, W]: the 9 shifted views of the zero-padded input side by side in
    channels_last ([N*H*W, 9*C_in], ordered tap by tap) against the output gradient ([N*H*W, C_out]), one matmul."""
    n, c, h, w = x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # [N, H+2, W+2, C]
    cols = torch.cat([padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], dim=-1)
    g = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])  # a view when grad_out is channels_last
    grad = g.t() @ cols.reshape(-1, 9 * c)  # [C_out, 9 * C_in]
    return grad.view(-1, 3, 3, c).permute(0, 3, 1, 2)


class _Conv3x3Im2colGrad(torch.autograd.Function):
    """conv2d(x, weight, padding=1) whose backward computes the filter gradient with `weight_grad_im2col`."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.dtypes = (x.dtype, weight.dtype)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast as autocast would for conv2d (a lower-precision op)
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(device, enabled=False):
            out = F.conv2d(x, weight, padding=1)
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        x_dtype, weight_dtype = ctx.dtypes
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = conv3x3_backward(grad_out, x, weight, (True, False))[0].to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_im2col(grad_out, x).to(weight_dtype)
        return grad_x, grad_w


class Im2colGradConv2d(nn.Conv2d):
    """An `nn.Conv2d` (3x3, stride 1, pad 1, no bias, one group) whose filter gradient is the im2col matmul for
    inputs of side <= MAX_SIDE while gradients are recorded; every other call is nn.Conv2d's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] <= MAX_SIDE and torch.is_grad_enabled() and self.weight.requires_grad:
            return _Conv3x3Im2colGrad.apply(x, self.weight)
        return super().forward(x)


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.bias is None and m.padding_mode == "zeros")


def use_im2col_filter_grad(model: nn.Module) -> int:
    """Switch every plain 3x3 convolution of `model` to Im2colGradConv2d (in place; same parameters) and return how
    many; which of them take the matmul is decided per call by the input's side."""
    convs = [m for m in model.modules() if _eligible(m)]
    for m in convs:
        m.__class__ = Im2colGradConv2d
    return len(convs)
