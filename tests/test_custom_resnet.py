import pytest
import torch

from fastcifar.config import ModelConfig
from fastcifar.custom_resnet import CustomResNet, count_parameters, summary

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
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


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
    plain = CustomResNet(ModelConfig(widths=(4, 8, 8, 16))).eval()
    scaled = CustomResNet(ModelConfig(widths=(4, 8, 8, 16), logit_scale=0.125)).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scaled(x), plain(x) * 0.125)
    assert count_parameters(scaled) == count_parameters(plain)
