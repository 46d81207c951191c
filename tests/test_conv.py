"""The im2col filter gradient of the 4x4 convolutions (fastcifar/conv.py): the same gradients as nn.Conv2d's, the same
parameters and outputs, and the same first training steps within bf16 rounding."""

import copy

import pytest
import torch
from torch import nn

from fastcifar import conv
from fastcifar.config import ModelConfig
from fastcifar.conv import (
    Im2colGradConv2d,
    conv3x3_backward,
    use_im2col_filter_grad,
    weight_grad_im2col,
)
from fastcifar.custom_resnet import CustomResNet
from fastcifar.training import train
from tests.conftest import tiny_config


def sgd_losses(model: torch.nn.Module, dtype: torch.dtype, batch: int, steps: int = 6) -> list[float]:
    """The losses of `steps` SGD steps (Nesterov, lr 0.2, label smoothing 0.2, bf16 autocast when `dtype` is bf16)
    of `model` on one fixed random channels_last batch: for comparing two ways of computing a step."""
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=generator)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("c_in", "c_out", "side"), [(3, 5, 6), (8, 4, 4), (16, 16, 2), (4, 8, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_the_im2col_filter_gradient_equals_the_convolution_backward(c_in, c_out, side, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, c_in, side, side).contiguous(memory_format=fmt)
    weight = torch.randn(c_out, c_in, 3, 3)
    grad_out = torch.randn(3, c_out, side, side).contiguous(memory_format=fmt)
    torch.testing.assert_close(weight_grad_im2col(grad_out, x), conv3x3_backward(grad_out, x, weight, (False, True))[1],
                               rtol=1e-4, atol=1e-4)


def _pair(c_in: int = 6, c_out: int = 5) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(0)
    plain = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    switched = copy.deepcopy(plain)
    assert use_im2col_filter_grad(switched) == 1 and type(switched) is Im2colGradConv2d
    return plain, switched


def _grads(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.backward(grad_out)
    grads = (out.detach(), x.grad, module.weight.grad)
    module.weight.grad = None
    return grads


@pytest.mark.parametrize("side", [1, 2, 4, 8])
def test_the_switched_conv_gives_nn_conv2ds_output_and_gradients_in_fp32(side, monkeypatch):
    plain, switched = _pair()
    calls = []
    original = conv._Conv3x3Im2colGrad.apply
    monkeypatch.setattr(conv._Conv3x3Im2colGrad, "apply", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(4, 6, side, side).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(4, 5, side, side)
    for got, expected in zip(_grads(switched, x, grad_out), _grads(plain, x, grad_out), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert bool(calls) == (side <= conv.MAX_SIDE)  # larger inputs go through nn.Conv2d itself


def test_under_bf16_autocast_the_output_is_oneDNNs_and_the_gradients_agree_within_bf16_rounding():
    plain, switched = _pair(32, 16)
    x = torch.randn(8, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(8, 16, 4, 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(switched, x, grad_out)
        expected = _grads(plain, x, grad_out)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], expected[0])  # the forward is the same call
    assert got[1].dtype == x.dtype and got[2].dtype == torch.float32  # gradients in the parameters' dtypes
    for a, b in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_no_gradient_is_computed_for_a_frozen_filter_or_an_input_without_grad():
    _, switched = _pair()
    switched.weight.requires_grad_(False)
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    switched(x).sum().backward()
    assert x.grad is not None and switched.weight.grad is None


def test_the_switch_keeps_the_networks_parameters_state_dict_and_outputs():
    torch.manual_seed(0)
    model = CustomResNet(ModelConfig(widths=(4, 8, 8, 16))).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    assert use_im2col_filter_grad(model) == 8  # every conv of the network is a plain 3x3 one
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    fresh = CustomResNet(ModelConfig(widths=(4, 8, 8, 16)))
    fresh.load_state_dict(model.state_dict())  # a model saved from a switched network loads into a plain one


def _losses(dtype: torch.dtype, im2col: bool) -> list[float]:
    torch.manual_seed(0)
    model = CustomResNet(ModelConfig(widths=(8, 16, 16, 32), logit_scale=0.125))
    if im2col:
        use_im2col_filter_grad(model)
    return sgd_losses(model, dtype, batch=32)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_the_first_training_steps_lose_the_same_as_with_the_library_gradient(dtype, tolerance):
    plain, switched = _losses(dtype, im2col=False), _losses(dtype, im2col=True)
    assert plain[-1] < plain[0]  # the steps do learn: the comparison is of a moving loss
    torch.testing.assert_close(torch.tensor(switched), torch.tensor(plain), rtol=tolerance, atol=tolerance)


def test_a_training_run_with_the_im2col_gradient_learns_and_names_it(synthetic, tmp_path):
    lines: list[str] = []
    result = train(tiny_config(synthetic, tmp_path, **{"run.conv_grad": "im2col", "schedule.epochs": 2}),
                   log=lines.append)
    assert any("conv_grad=im2col" in line for line in lines)
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]


@pytest.mark.slow
def test_the_switched_conv_compiles_and_gives_the_eager_gradients():
    plain, switched = _pair()
    compiled = torch.compile(switched, dynamic=False)
    x = torch.randn(4, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(4, 5, 4, 4)
    for got, expected in zip(_grads(compiled, x, grad_out), _grads(plain, x, grad_out), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
