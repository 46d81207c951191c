"""The fused BatchNorm + ReLU experiment (benchmarks/fused_bn_relu.py): the same outputs, gradients and running
statistics as BatchNorm2d followed by ReLU, and the module swap leaves the network's parameters and state dict
alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks import fused_bn_relu as bn_relu
from benchmarks.relu_kink import narrow_network, record_kink_margin
from fastcifar.custom_resnet import GhostBatchNorm2d
from fastcifar.errors import FastCifarError
from tests.conftest import needs_build_tools, sgd_losses

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _pair(channels: int, frozen_weight: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    ref = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
    with torch.no_grad():
        ref[0].weight.uniform_(0.5, 1.5)
        ref[0].bias.uniform_(-0.5, 0.5)
        ref[0].running_var.uniform_(0.5, 2.0)
    ref[0].weight.requires_grad_(not frozen_weight)
    fused = copy.deepcopy(ref)
    assert bn_relu.fuse_bn_relu(fused) == 1
    return ref, fused


@needs_build_tools
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 16, 6, 6), (4, 40, 3, 5), (2, 3, 1, 2)])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_fused_bn_relu_matches_batch_norm_then_relu(dtype, shape, frozen_weight):
    ref, fused = _pair(shape[1], frozen_weight)
    torch.manual_seed(2)
    x = (torch.randn(shape) * 2 + 3).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fused = ref(x_ref), fused(x_fused)
    out_ref.backward(grad)
    out_fused.backward(grad)
    assert out_fused.dtype == dtype and out_fused.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_ref > 0, out_fused > 0)  # the same ReLU mask, so the gradients are comparable
    torch.testing.assert_close(out_fused, out_ref, **TOL[dtype])
    torch.testing.assert_close(x_fused.grad, x_ref.grad, **TOL[dtype])
    torch.testing.assert_close(fused[0].bias.grad, ref[0].bias.grad, atol=1e-4, rtol=1e-4)
    if frozen_weight:
        assert fused[0].weight.grad is None
    else:
        torch.testing.assert_close(fused[0].weight.grad, ref[0].weight.grad, atol=1e-4, rtol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused[0], name), getattr(ref[0], name), atol=1e-6, rtol=1e-5)


@needs_build_tools
def test_the_statistics_survive_a_large_mean():
    """The batch variance of values far from zero (mean 1000, std 1): one-pass sums of squares in fp32 would lose
    it to cancellation; the kernel's shifted sums keep it."""
    x = (torch.randn(64, 8, 8, 8, dtype=torch.float64) + 1000).float().contiguous(memory_format=torch.channels_last)
    bn = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
    bn_relu.fuse_bn_relu(bn)
    bn(x)
    expected = 0.9 * 1 + 0.1 * x.double().var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn[0].running_var.double(), expected, atol=1e-4, rtol=1e-4)


@needs_build_tools
def test_a_plain_nchw_input_is_accepted_and_eval_mode_is_batch_norm_then_relu():
    ref, fused = _pair(5, frozen_weight=False)
    x = torch.randn(4, 5, 3, 3)  # NCHW contiguous
    torch.testing.assert_close(fused(x), ref(x.clone()), atol=1e-5, rtol=1e-5)
    ref.eval()
    fused.eval()
    torch.testing.assert_close(fused(x), ref(x.clone()), atol=1e-6, rtol=1e-6)  # running stats: rounding apart


# Whole-network comparisons cross a ReLU kink: where a pre-activation lies within rounding (~1e-6) of zero, two fp32
# implementations may put it on different sides, and that one element's gradient then differs by its whole size.
# `python -m benchmarks.relu_kink` measures it on this test's network with ordinary biases: on 1 thread eager
# BatchNorm2d + ReLU's own fp32 gradients are 11% of their scale from fp64's (2 of 368,640 ReLU decisions flipped),
# the fused kernel's 4e-6. So the network tests set every BatchNorm's bias to +/-2.5 by channel, which keeps
# pre-activations away from zero, and check that margin in the unfused run before comparing: below it the comparison
# would be ill-posed, not failed.
KINK_MARGIN = 5e-6


@needs_build_tools
def test_fusing_the_network_keeps_its_parameters_and_state_dict_and_its_training_outputs():
    ref = narrow_network(seed=2, bias_offset=2.5).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(ref)
    assert bn_relu.fuse_bn_relu(fused) == 8
    assert not any(type(m) is nn.ReLU for m in fused.modules())
    assert list(fused.state_dict()) == list(ref.state_dict())
    margins = record_kink_margin(ref)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out_ref, out_fused = ref(x), fused(x)
    assert min(margins) > KINK_MARGIN, f"a pre-activation within {min(margins):.1e} of the ReLU's kink"
    torch.testing.assert_close(out_fused, out_ref, atol=1e-5, rtol=1e-5)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters(), strict=True):
        # relative to the tensor's scale: these filter gradients are sums with much cancellation (BatchNorm takes
        # the mean out), so their small entries carry the large entries' absolute rounding
        error = (p_fused.grad - p_ref.grad).abs().max() / p_ref.grad.abs().max()
        assert error < 1e-4, f"{name}: {error:.1e}"
    ref.load_state_dict(fused.state_dict())  # checkpoints load either way


def _losses(dtype: torch.dtype, fused: bool) -> tuple[list[float], list[float]]:
    """Six SGD steps' losses of the narrow network, and (unfused only) the kink margins of every step."""
    model = narrow_network(seed=3, bias_offset=2.5, logit_scale=0.125)
    margins = [] if fused else record_kink_margin(model)
    if fused:
        bn_relu.fuse_bn_relu(model)
    return sgd_losses(model, dtype, batch=8), margins


@needs_build_tools
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_first_training_steps_lose_the_same_as_unfused(dtype):
    """Same numerics: 6 SGD steps, fused against unfused. In fp32, with the pre-activations off the kink, the losses
    agree to rounding at every step. In bf16 every BatchNorm output is rounded to 8 bits, and the two round
    differently, so they drift apart as the steps go: the bounds, 5e-3 over the first three losses and 2e-2 over
    six, are bf16's own noise, the size of the gap between unfused bf16 and fp32 losses."""
    (plain, margins), (fused, _) = _losses(dtype, fused=False), _losses(dtype, fused=True)
    assert plain[-1] < plain[0]  # the steps do learn: the comparison is of a moving loss
    if dtype == torch.float32:
        assert min(margins) > KINK_MARGIN, f"a pre-activation within {min(margins):.1e} of the ReLU's kink"
        torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(torch.tensor(fused[:3]), torch.tensor(plain[:3]), rtol=5e-3, atol=5e-3)
        torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=2e-2, atol=2e-2)


def test_ghost_batch_norm_and_a_batch_norm_without_a_relu_are_left_alone():
    model = nn.Sequential(GhostBatchNorm2d(4, ghost_batch=2), nn.ReLU(), nn.BatchNorm2d(4), nn.Identity())
    assert bn_relu.fuse_bn_relu(model) == 0
    assert type(model[2]) is nn.BatchNorm2d and type(model[1]) is nn.ReLU


@pytest.fixture
def unbuilt(monkeypatch: pytest.MonkeyPatch):
    """load_extension as on a machine that has not built the kernel (its cache cleared before and after), with the
    extension loader's `load` to be replaced by the test."""
    from torch.utils import cpp_extension

    bn_relu.load_extension.cache_clear()
    yield cpp_extension
    bn_relu.load_extension.cache_clear()


def test_a_build_failure_becomes_one_clear_error(monkeypatch, unbuilt):
    def fail(**_: object) -> None:
        raise RuntimeError("Error building extension 'x'\nninja: build stopped: subcommand failed.")

    monkeypatch.setattr(unbuilt, "load", fail)
    monkeypatch.setattr(bn_relu, "missing_tools", list)
    with pytest.raises(FastCifarError, match=r"ninja: build stopped.*install a C\+\+ compiler"):
        bn_relu.load_extension()


def test_missing_build_tools_are_named_before_a_build_is_tried(monkeypatch, unbuilt):
    monkeypatch.setattr(bn_relu.shutil, "which", lambda tool: None if tool == "ninja" else f"/usr/bin/{tool}")
    assert bn_relu.missing_tools() == ["ninja"]
    monkeypatch.setattr(unbuilt, "load", lambda **_: pytest.fail("a build was tried"))
    with pytest.raises(FastCifarError, match=r"kernel: ninja not found; install a C\+\+ compiler and ninja"):
        bn_relu.load_extension()
