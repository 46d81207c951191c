"""benchmarks/relu_kink.py: the network it builds, the kink margin it records, and its report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import relu_kink
from tests.conftest import needs_build_tools


def test_the_bias_offset_sets_every_batch_norm_bias_by_channel():
    model = relu_kink.narrow_network(seed=0, bias_offset=2.5)
    bns = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    assert len(bns) == 8
    for bn in bns:
        assert bn.bias.tolist() == [2.5, -2.5] * (bn.num_features // 2)
    plain = relu_kink.narrow_network(seed=0)
    assert all(not m.bias.any() for m in plain.modules() if type(m) is nn.BatchNorm2d)


def test_the_kink_margin_is_the_smallest_pre_activation_of_each_call():
    bn = nn.BatchNorm2d(2)
    margins = relu_kink.record_kink_margin(nn.Sequential(bn, nn.ReLU()))
    x = torch.randn(4, 2, 3, 3)
    bn(x)
    pre = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
    assert margins == [pytest.approx(pre.abs().min().item())]


@needs_build_tools
def test_off_the_kink_both_ways_match_fp64_and_flip_nothing(capsys):
    r = relu_kink.compare(seed=2, batch=8, bias_offset=2.5)
    per_image = 8 * 32 * 32 + 3 * 16 * 16 * 16 + 16 * 8 * 8 + 3 * 32 * 4 * 4  # the 8 BatchNorms' outputs
    assert r["margin"] > 5e-6 and r["pre_activations"] == 8 * per_image
    for way in ("eager", "fused"):
        assert r[f"{way}_flips"] == 0 and r[f"{way}_error"] < 1e-4
    relu_kink.main(["--threads", str(torch.get_num_threads()), "--batch", "4"])
    assert "fused fp32 against fp64: gradient error" in capsys.readouterr().out


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit) as err:
        relu_kink.main(["--batch", "1"])
    assert err.value.code == 2 and "--batch" in capsys.readouterr().err
