import numpy as np
import pytest
import torch

from fastcifar.schedule import make_scheduler, one_cycle_lr

SPE, EPOCHS, PEAK, LO, HI = 98, 24, 5, 0.04, 0.4


def test_rises_to_max_at_the_end_of_the_peak_epoch_then_falls_to_min():
    steps = np.arange(SPE * EPOCHS)
    lrs = one_cycle_lr(steps, SPE, EPOCHS, PEAK, LO, HI)
    assert lrs[0] == pytest.approx(LO)
    assert lrs.argmax() == PEAK * SPE and lrs.max() == pytest.approx(HI)
    assert np.all(np.diff(lrs[: PEAK * SPE + 1]) > 0) and np.all(np.diff(lrs[PEAK * SPE:]) < 0)
    assert lrs.min() >= LO  # no annihilation below min_lr
    assert lrs[-1] == pytest.approx(LO, abs=(HI - LO) / (SPE * (EPOCHS - PEAK)) + 1e-12)


def test_scheduler_follows_the_function_step_by_step():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=123.0, momentum=0.9)
    sched = make_scheduler(opt, SPE, 2, 1, LO, HI)
    seen = []
    for _ in range(2 * SPE):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, one_cycle_lr(np.arange(2 * SPE), SPE, 2, 1, LO, HI), rtol=1e-12)


def test_end_lr_replaces_min_lr_at_the_end_only():
    lrs = one_cycle_lr(np.array([0, 5 * SPE, 24 * SPE]), SPE, 24, 5, 0.004, 0.4, end_lr=0.0)
    np.testing.assert_allclose(lrs, [0.004, 0.4, 0.0])
    same = one_cycle_lr(np.arange(24 * SPE), SPE, 24, 5, LO, HI, end_lr=-1)
    np.testing.assert_array_equal(same, one_cycle_lr(np.arange(24 * SPE), SPE, 24, 5, LO, HI))
