"""MuonSGD: SGD groups step exactly as torch.optim.SGD; Muon groups take orthogonalised, norm-fixed steps."""

import pytest
import torch
from torch import nn

from fastcifar.muon import MuonSGD, orthogonalize


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32), (10, 512)])
def test_orthogonalize_pushes_every_singular_value_near_one(shape):
    gen = torch.Generator().manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
    s = torch.logspace(0, -1.3, k)  # a gradient with a 20x spread of singular values
    g = u @ torch.diag(s) @ v.T
    out = orthogonalize(g)
    assert out.shape == g.shape
    s_out = torch.linalg.svdvals(out)
    assert s_out.min() > 0.5 and s_out.max() < 1.5, s_out
    core = u.T @ out @ v  # same singular vectors: in their basis the result is diagonal
    assert (core - torch.diag(core.diagonal())).abs().max() < 1e-3


def test_orthogonalize_refuses_other_than_matrices():
    with pytest.raises(ValueError, match="2-D"):
        orthogonalize(torch.randn(2, 3, 3))


def _params(seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(8, 4, 3, 3, generator=gen)), nn.Parameter(torch.randn(8, generator=gen))]


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_groups_step_exactly_like_torch_sgd(nesterov):
    ours, theirs = _params(0), _params(0)
    opt = MuonSGD([{"params": ours}], lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-3)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-3)
    for step in range(4):
        grads = _params(10 + step)
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.detach().clone(), g.detach().clone()
        opt.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))


def test_muon_groups_fix_the_filter_norm_and_step_along_the_orthogonalised_momentum():
    (weight, _) = _params(0)
    weight = nn.Parameter(weight.detach().contiguous(memory_format=torch.channels_last))  # as in training
    opt = MuonSGD([{"params": [weight], "muon": True, "momentum": 0.6}], lr=0.2, nesterov=True)
    start = weight.detach().clone()
    grads = [_params(5)[0], _params(6)[0]]
    buf = torch.zeros_like(start)
    expected = start
    for g in grads:
        weight.grad = g.clone()
        opt.step()
        buf = g.clone() if buf.abs().sum() == 0 else 0.6 * buf + g
        update = g + 0.6 * buf
        expected = expected * (8 ** 0.5 / expected.norm())
        expected = expected - 0.2 * orthogonalize(update.reshape(8, -1)).view_as(expected)
    assert torch.allclose(weight, expected, atol=1e-5)
    assert not torch.allclose(weight, start)


def test_muon_groups_take_matrices_only_and_no_closure():
    with pytest.raises(ValueError, match="matrices or conv filters"):
        MuonSGD([{"params": [nn.Parameter(torch.ones(3))], "muon": True}], lr=0.1)
    opt = MuonSGD(_params(0), lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)


def test_state_saves_and_loads_like_any_optimizer():
    params = _params(0)
    opt = MuonSGD([{"params": params[:1], "muon": True}, {"params": params[1:]}], lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    other = MuonSGD([{"params": _params(0)[:1], "muon": True}, {"params": _params(0)[1:]}], lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert torch.equal(other.state_dict()["state"][0]["momentum_buffer"], torch.ones(8, 4, 3, 3))
