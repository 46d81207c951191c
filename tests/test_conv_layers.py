"""experiments/conv_layers.py: the per-layer convolution timing behind run.conv_grad's choice."""

import json

import pytest
import torch

from experiments import conv_layers
from fastcifar.conv import conv3x3_backward


def test_the_conv_table_lists_the_spec_networks_eight_convolutions():
    shapes = conv_layers.conv_shapes()
    assert [s[1:] for s in shapes] == [(3, 64, 32), (64, 128, 32), (128, 128, 16), (128, 128, 16), (128, 256, 16),
                                       (256, 512, 8), (512, 512, 4), (512, 512, 4)]


@pytest.mark.parametrize("name", sorted(conv_layers.FORMULATIONS))
@pytest.mark.parametrize(("c_in", "c_out", "side"), [(3, 5, 6), (8, 4, 4), (4, 4, 1)])
def test_every_filter_gradient_formulation_equals_the_convolution_backward(name, c_in, c_out, side):
    torch.manual_seed(0)
    x = torch.randn(3, c_in, side, side).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(3, c_out, side, side).contiguous(memory_format=torch.channels_last)
    expected = conv3x3_backward(grad_out, x, torch.randn(c_out, c_in, 3, 3), (False, True))[1]
    torch.testing.assert_close(conv_layers.FORMULATIONS[name](grad_out, x), expected, rtol=1e-4, atol=1e-4)


def test_an_unknown_formulation_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        conv_layers.main(["--formulations", "im2col,winograd"])
    assert err.value.code == 2 and "unknown formulation 'winograd'" in capsys.readouterr().err


def test_the_conv_benchmark_runs_and_records_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(conv_layers, "conv_shapes", lambda: [("a", 3, 4, 4), ("b", 4, 8, 2)])
    monkeypatch.setattr(conv_layers, "matmul_peak", lambda dtype, device: 1e9)
    out = tmp_path / "conv.json"
    conv_layers.main(["--batch-size", "2", "--dtype", "fp32", "--repeats", "1", "--formulations", "im2col,shift",
                      "--out", str(out)])
    record = json.loads(out.read_text())
    assert [r["layer"] for r in record["layers"]] == ["a", "b"] and record["dtype"] == "fp32"
    assert all(s > 0 for r in record["layers"] for s in r["seconds"].values())
    assert record["layers"][1]["flops_per_pass"] == 2 * 2 * 2 * 2 * 4 * 8 * 9
    assert {"grad_weight_im2col", "grad_weight_shift"} == {k for k in record["layers"][0]["seconds"] if "_" in k
                                                           and k.startswith("grad_weight_")}
    assert "grad_weight_shift" in capsys.readouterr().out
