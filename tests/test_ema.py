"""WeightEMA: the average follows the formula, covers BN statistics, and saves/loads."""

import pytest
import torch
from torch import nn

from fastcifar.config import ModelConfig
from fastcifar.custom_resnet import CustomResNet
from fastcifar.ema import Lookahead, WeightEMA


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))


def test_decay_warms_up_then_stays_at_the_set_value():
    ema = WeightEMA(tiny_net(), 0.99)
    decays = []
    for _ in range(2000):
        decays.append(ema.current_decay())
        ema.updates += 1
    assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(2 / 11)
    assert all(a <= b for a, b in zip(decays, decays[1:], strict=False)) and decays[-1] == 0.99


def test_update_is_the_exponential_average_of_parameters_and_bn_statistics():
    net = tiny_net()
    ema = WeightEMA(net, 0.5)
    ema.updates = 100  # past the warm-up: decay 0.5
    start_w, start_mean = ema.module[0].weight.clone(), ema.module[1].running_mean.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(8, 3, 6, 6))  # moves the BN statistics and its batch counter
    ema.update(net)
    assert torch.allclose(ema.module[0].weight, (start_w + net[0].weight) / 2)
    assert torch.allclose(ema.module[1].running_mean, (start_mean + net[1].running_mean) / 2)
    assert ema.module[1].num_batches_tracked == net[1].num_batches_tracked == 1  # integers are copied
    assert not ema.module[0].weight.requires_grad and not ema.module.training


def test_average_converges_to_fixed_weights_and_leaves_the_model_alone():
    net = tiny_net()
    ema = WeightEMA(net, 0.9)
    with torch.no_grad():
        net[0].weight.mul_(3)
    before = net[0].weight.clone()
    for _ in range(300):
        ema.update(net)
    assert torch.allclose(ema.module[0].weight, net[0].weight, atol=1e-6)
    assert torch.equal(net[0].weight, before)


def test_state_round_trip_and_loads_into_a_fresh_network():
    cfg = ModelConfig(widths=(8, 16, 32, 64))
    net = CustomResNet(cfg)
    ema = WeightEMA(net, 0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    ema.update(net)
    other = WeightEMA(CustomResNet(cfg), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and other.decay == 0.9
    fresh = CustomResNet(cfg)
    fresh.load_state_dict(ema.state_dict()["module"])
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), other.module(x))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_invalid_decay_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(tiny_net(), decay)


def test_lookahead_pulls_back_every_k_steps_with_a_growing_weight_and_finishes_on_the_slow_weights():
    net = tiny_net()
    look = Lookahead(net, every=5, base_decay=0.8)
    assert look.decay(0.0) == 0.0 and look.decay(0.5) == pytest.approx(0.1) and look.decay(1.0) == pytest.approx(0.8)
    slow = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.add_(2.0)
    look.step(net, 4, 10)  # not a multiple of 5: nothing happens
    assert torch.equal(net[0].weight, slow + 1)
    look.step(net, 5, 10)  # decay 0.8 * 0.5**3 = 0.1: slow moves 90% of the way, the weights jump back to it
    moved = slow + 0.9
    assert torch.allclose(net[0].weight, moved) and torch.allclose(look.slow[0], moved)
    assert torch.allclose(net[1].running_mean, torch.full((4,), 1.8))  # statistics too
    with torch.no_grad():
        net[0].weight.add_(5.0)
    look.finish(net)
    assert torch.allclose(net[0].weight, moved)
    assert int(net[1].num_batches_tracked) == 0  # integer counters untouched


def test_lookahead_state_round_trips():
    net = tiny_net()
    look = Lookahead(net, every=2)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    look.step(net, 2, 2)
    other = Lookahead(tiny_net(), every=3)
    other.load_state_dict(look.state_dict())
    assert other.every == 2 and all(torch.equal(a, b) for a, b in zip(other.slow, look.slow, strict=True))
