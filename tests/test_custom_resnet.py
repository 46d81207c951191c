import pytest
import torch

from fastcifar.config import ModelConfig
from fastcifar.custom_resnet import (
    CustomResNet,
    GhostBatchNorm2d,
    GlobalMaxPool,
    count_parameters,
    dirac_init,
    freeze_prep_conv,
    summary,
    whiten_init,
    whitening_filters,
)

TINY = ModelConfig(widths=(4, 8, 16, 32))


def test_parameter_count_is_exactly_the_spec():
    assert count_parameters(CustomResNet()) == 6_573_120


def test_convolutions_and_fc_have_no_bias():
    model = CustomResNet(TINY)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))


@pytest.mark.parametrize("batch", [1, 5])
def test_forward_shape_backward_and_no_nans(batch):
    model = CustomResNet(TINY)
    x = torch.randn(batch, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (batch, 10)
    logits.sum().backward()
    trained = [p for p in model.parameters() if p.requires_grad]  # the default recipe freezes the BN scales
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


def test_predict_proba_is_the_softmax_of_the_logits():
    model = CustomResNet(TINY).eval()
    x = torch.randn(4, 3, 32, 32)
    probs = model.predict_proba(x)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(probs, torch.softmax(model(x), dim=1))


def test_channels_last_gives_the_same_output():
    model = CustomResNet(TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected,
                               rtol=1e-4, atol=1e-4)


def test_summary_lists_layers_and_the_total():
    text = summary(CustomResNet())
    assert "Total params: 6,573,120" in text
    assert "layer3" in text and "[1, 10]" in text


def test_logit_scale_multiplies_the_logits_and_adds_no_parameters():
    torch.manual_seed(0)
    plain = CustomResNet(ModelConfig(widths=(4, 8, 8, 16), logit_scale=1.0)).eval()
    scaled = CustomResNet(ModelConfig(widths=(4, 8, 8, 16), logit_scale=0.125)).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scaled(x), plain(x) * 0.125)
    assert count_parameters(scaled) == count_parameters(plain)


def test_bn_momentum_reaches_every_batch_norm_and_adds_no_parameters():
    model = CustomResNet(ModelConfig(bn_momentum=0.4))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 8 and all(m.momentum == 0.4 for m in norms)
    assert count_parameters(model) == 6_573_120


def correlated_images(n: int = 64) -> torch.Tensor:
    """Smooth, channel-correlated images: their 3x3 patches are far from white."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.randn(n, 1, 36, 36, generator=g), 5, stride=1)
    noise = torch.randn(n, 2, 32, 32, generator=g)
    return torch.cat([base, 0.8 * base + 0.2 * noise[:, :1], 0.3 * noise[:, 1:] - base], dim=1)


def test_whitening_filters_whiten_the_patches():
    images = correlated_images()
    filters = whitening_filters(images, eps=1e-9)
    assert filters.shape == (27, 3, 3, 3)
    out = torch.nn.functional.conv2d(images, filters).transpose(0, 1).reshape(27, -1)  # no padding: whole patches
    cov = torch.cov(out.double())
    assert torch.allclose(cov, torch.eye(27, dtype=torch.float64), atol=1e-3)
    raw = torch.corrcoef(torch.nn.functional.unfold(images, 3).transpose(1, 2).reshape(-1, 27).T.double())
    assert (raw - torch.eye(27, dtype=torch.float64)).abs().max() > 0.5  # the input was correlated


@pytest.mark.parametrize(("widths", "expected"), [((64, 128, 256, 512), 54), ((8, 16, 32, 64), 8)])
def test_whiten_init_sets_plus_minus_pairs_and_keeps_the_rest(widths, expected):
    model = CustomResNet(ModelConfig(widths=widths))
    before = model.prep[0].weight.clone()
    assert whiten_init(model, correlated_images(16)) == expected
    weight = model.prep[0].weight
    k = expected // 2
    assert torch.equal(weight[:k], -weight[k:expected])
    assert torch.equal(weight[expected:], before[expected:]) and not torch.equal(weight[:k], before[:k])
    assert torch.isfinite(weight).all()


def test_dirac_init_makes_the_residual_convs_identities_and_leaves_prep_alone():
    torch.manual_seed(0)
    plain = CustomResNet(TINY)
    torch.manual_seed(0)
    model = CustomResNet(TINY.__class__(widths=TINY.widths, dirac_init=True))
    assert torch.equal(model.prep[0].weight, plain.prep[0].weight)
    x = torch.randn(2, 8, 16, 16)
    conv = model.layer1.res.conv1[0]
    assert torch.allclose(conv(x), x, atol=1e-6)  # 8 -> 8 channels: the whole conv is the identity
    widening = model.layer1.conv[0]  # 4 -> 8: the first 4 outputs copy the inputs, the others stay random
    y = torch.randn(2, 4, 16, 16)
    assert torch.allclose(widening(y)[:, :4], y, atol=1e-6)
    assert torch.equal(widening.weight[4:], plain.layer1.conv[0].weight[4:])
    assert dirac_init(model) == 7  # every conv but prep's


def test_frozen_bn_scales_and_prep_conv_keep_the_parameter_count_but_get_no_gradient():
    model = CustomResNet(ModelConfig(bn_weight_frozen=True))
    freeze_prep_conv(model)
    assert count_parameters(model) == 6_573_120
    frozen_bn = 64 + 3 * 128 + 256 + 3 * 512
    assert count_parameters(model, trainable_only=True) == 6_573_120 - frozen_bn - 1_728
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.prep[0].weight.grad is None and model.prep[1].weight.grad is None
    assert model.prep[1].bias.grad is not None and model.layer1.conv[0].weight.grad is not None


def reference_ghost_bn(x: torch.Tensor, group: int, running: torch.nn.BatchNorm2d) -> torch.Tensor:
    """What ghost batch norm means, written out: every group normalised by its own mean and (biased) variance;
    the running statistics moved once, towards the groups' mean mean and mean unbiased variance."""
    outs, means, variances = [], [], []
    for g in x.split(group):
        mean, var = g.mean(dim=(0, 2, 3)), g.var(dim=(0, 2, 3), unbiased=False)
        outs.append((g - mean[:, None, None]) / (var[:, None, None] + running.eps).sqrt()
                    * running.weight[:, None, None] + running.bias[:, None, None])
        means.append(mean)
        variances.append(g.var(dim=(0, 2, 3), unbiased=True))
    m = running.momentum
    with torch.no_grad():
        running.running_mean.mul_(1 - m).add_(m * torch.stack(means).mean(0))
        running.running_var.mul_(1 - m).add_(m * torch.stack(variances).mean(0))
    return torch.cat(outs)


@pytest.mark.parametrize("n, group", [(64, 16), (50, 16), (24, 8)])  # 50: a last group of 2, as an epoch's last batch
@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_bn_normalises_each_group_by_its_own_statistics(n, group, channels_last):
    torch.manual_seed(0)
    x = torch.randn(n, 6, 5, 5) * 3 + torch.arange(n, dtype=torch.float)[:, None, None, None] / 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ghost = GhostBatchNorm2d(6, group, momentum=0.3)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-1, 1)
    expected_bn = torch.nn.BatchNorm2d(6, momentum=0.3)
    expected_bn.load_state_dict(ghost.state_dict())
    out = ghost(x)
    torch.testing.assert_close(out, reference_ghost_bn(x, group, expected_bn), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ghost.running_mean, expected_bn.running_mean)
    torch.testing.assert_close(ghost.running_var, expected_bn.running_var)
    assert int(ghost.num_batches_tracked) == 1
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    # Groups differ, so this is not plain BatchNorm: the batch as a whole is normalised differently.
    assert not torch.allclose(out, torch.nn.BatchNorm2d(6).train()(x), atol=1e-3)


def test_ghost_bn_gets_gradients_and_evaluates_as_plain_batch_norm():
    torch.manual_seed(0)
    ghost, plain = GhostBatchNorm2d(4, 8), torch.nn.BatchNorm2d(4)
    x = torch.randn(32, 4, 3, 3, requires_grad=True)
    ghost(x).square().sum().backward()
    assert x.grad is not None and ghost.weight.grad is not None and ghost.bias.grad is not None
    plain.load_state_dict(ghost.state_dict())
    ghost.eval(), plain.eval()
    torch.testing.assert_close(ghost(x), plain(x))
    whole = GhostBatchNorm2d(4, 32).train()  # a group as large as the batch: plain BatchNorm in training too
    torch.testing.assert_close(whole(x), torch.nn.BatchNorm2d(4).train()(x))


def test_ghost_batch_reaches_every_batch_norm_and_keeps_the_parameter_count_and_state_dict():
    ghost, plain = CustomResNet(ModelConfig(ghost_batch=32)), CustomResNet()
    norms = [m for m in ghost.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 8 and all(isinstance(m, GhostBatchNorm2d) and m.ghost_batch == 32 for m in norms)
    assert count_parameters(ghost) == 6_573_120
    assert ghost.state_dict().keys() == plain.state_dict().keys()
    assert not any(isinstance(m, GhostBatchNorm2d) for m in plain.modules())


def test_under_bf16_autocast_batch_norm_sees_and_returns_bf16_activations():
    # the training step's precision on a bf16 CPU: autocast casts the weights, never the activations around BN
    model = CustomResNet(ModelConfig(widths=(4, 8, 8, 16))).to(memory_format=torch.channels_last)
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype, m.weight.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    assert len(seen) == 8 and set(seen) == {(torch.bfloat16, torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("side", [8, 20, 24, 28])
def test_the_network_takes_smaller_images_with_the_same_parameters(side):
    model = CustomResNet()
    logits = model(torch.randn(2, 3, side, side))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert count_parameters(model) == 6_573_120


def test_the_global_max_pool_is_the_specs_4x4_max_pool_at_32x32():
    x = torch.randn(4, 512, 4, 4, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    weights = torch.randn(4, 512, 1, 1)
    (GlobalMaxPool()(x) * weights).sum().backward()
    (torch.nn.MaxPool2d(4)(y) * weights).sum().backward()
    assert torch.equal(GlobalMaxPool()(x), torch.nn.MaxPool2d(4)(y)) and torch.equal(x.grad, y.grad)
