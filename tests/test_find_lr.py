import json

import numpy as np
import pytest
import torch

from fastcifar.cli import config_from_args
from fastcifar.config import Config, ConfigError, LRFinderConfig
from fastcifar.errors import FastCifarError
from fastcifar.lr_finder import find_lr, lr_at, range_test, suggest
from fastcifar.session import Session
from fastcifar.training import build_parser
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def session(synthetic, tmp_path_factory):
    return Session.open(tiny_config(synthetic, tmp_path_factory.mktemp("lr")), log=lambda _: None)


def _state(session):
    return ({k: v.clone() for k, v in session.trainer.module.state_dict().items()},
            json.dumps(session.trainer.optimizer.state_dict()["param_groups"]))


def test_range_test_returns_a_growing_lr_curve_and_restores_everything(session):
    before_weights, before_groups = _state(session)
    cfg = LRFinderConfig(start_lr=1e-3, end_lr=1e-1, steps=20, diverge_factor=1e6)
    curve = range_test(session.trainer, session.loaders.train, cfg)
    assert len(curve["lrs"]) == 20 and not curve["diverged"]
    np.testing.assert_allclose(curve["lrs"], np.geomspace(1e-3, 1e-1, 20))
    assert all(np.isfinite(curve["losses"])) and len(curve["smoothed"]) == 20
    after_weights, after_groups = _state(session)
    assert after_weights.keys() == before_weights.keys()
    for name, tensor in before_weights.items():  # weights and BN statistics, bit for bit
        assert torch.equal(tensor, after_weights[name]), name
    assert after_groups == before_groups and session.trainer.optimizer.state_dict()["state"] == {}


def test_range_test_stops_on_divergence(session):
    cfg = LRFinderConfig(start_lr=1e-2, end_lr=1e6, steps=60, diverge_factor=2.0)
    curve = range_test(session.trainer, session.loaders.train, cfg)
    assert curve["diverged"] and len(curve["lrs"]) < 60


def test_linear_mode():
    cfg = LRFinderConfig(start_lr=0.1, end_lr=1.0, steps=10, mode="linear")
    assert [round(lr_at(i, cfg), 6) for i in (0, 9)] == [0.1, 1.0]
    assert lr_at(1, cfg) == pytest.approx(0.2)


def test_suggestion_rule_on_a_hand_made_curve():
    lrs = np.geomspace(1e-4, 10, 101)
    x = np.log10(lrs)
    # falls fastest at lr = 1e-2 (x = -2), bottoms out at lr = 0.1 (x = -1), then climbs steeply
    loss = 2.3 - 1.5 / (1 + np.exp(-3 * (x + 2))) + np.where(x > -1, 4 * (x + 1) ** 2, 0.0)
    s = suggest(list(lrs), list(loss), min_lr_divisor=10)
    assert s["max_lr"] == s["min_loss_lr"] == pytest.approx(lrs[np.argmin(loss)])
    assert s["max_lr"] == pytest.approx(0.1, rel=0.15)
    assert s["min_lr"] == pytest.approx(s["max_lr"] / 10)
    assert s["steepest_lr"] == pytest.approx(0.01, rel=0.13)


def test_suggestion_refuses_a_curve_that_never_falls():
    with pytest.raises(FastCifarError, match="never fell"):
        suggest([1e-3, 1e-2, 1e-1, 1], [1.0, 2.0, 3.0, 4.0], 10)


def test_find_lr_writes_json_and_png_and_train_takes_it(synthetic, tmp_path):
    cfg = tiny_config(synthetic, tmp_path, **{"run.name": "lr", "lr_finder.steps": 30, "lr_finder.start_lr": 1e-3,
                                              "lr_finder.end_lr": 10})
    logs = []
    result = find_lr(cfg, log=logs.append)
    path = tmp_path / "lr" / "find_lr.json"
    # the suggested command names the preset it tested: the default preset is another recipe
    assert logs[-1].endswith(f"train with: python -m fastcifar train --preset reference --lr-from {path}")
    saved = json.loads(path.read_text())
    assert saved["suggestion"] == result["suggestion"] and saved["batch_size"] == 64
    assert (tmp_path / "lr" / "find_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trained = config_from_args(build_parser().parse_args(["--lr-from", str(path)]))
    assert trained.schedule.max_lr == pytest.approx(result["suggestion"]["max_lr"])
    assert trained.schedule.min_lr == pytest.approx(result["suggestion"]["min_lr"])
    assert trained.schedule.lr_from == str(path)
    with pytest.raises(ConfigError, match="either --lr-from or --min-lr/--max-lr"):
        config_from_args(build_parser().parse_args(["--lr-from", str(path), "--max-lr", "1"]))
    with pytest.raises(ConfigError, match="not a find_lr.json"):
        config_from_args(build_parser().parse_args(["--lr-from", str(tmp_path / "lr" / "config.json")]))


def test_epoch_wise_sweep(synthetic, tmp_path):
    cfg = tiny_config(synthetic, tmp_path, **{"run.name": "sweep", "lr_finder.method": "epochs",
                                              "lr_finder.sweep": "0.01,0.05", "lr_finder.sweep_images": 256})
    result = find_lr(cfg, log=lambda _: None)
    rows = result["sweep"]
    best = max(rows, key=lambda r: r["train_acc"])
    assert result["suggestion"]["max_lr"] == best["lr"] and result["suggestion"]["min_lr"] == best["lr"] / 10
    assert "seed_sweep" not in result  # other LRs than the seed's: nothing to put beside them
    assert [r["lr"] for r in rows] == [0.01, 0.05] and all(r["images"] == 256 for r in rows)
    assert rows[0]["train_loss"] != rows[1]["train_loss"]  # each LR really trained at its own LR
    assert all(0 <= r["train_acc"] <= 1 and np.isfinite(r["train_loss"]) for r in rows)
    assert (tmp_path / "sweep" / "lr_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert Config.from_dict(json.loads((tmp_path / "sweep" / "config.json").read_text())).data.train_subset == 256


def test_the_seeds_sweep_runs_at_its_own_weight_decay_beside_the_seeds_output(synthetic, tmp_path):
    """The reference preset's epoch-wise finder: the seed's ten LRs at the seed finder's weight decay (0.05, not
    the training's 0.005), with the seed's own output recorded beside ours."""
    cfg = Config.from_preset("reference")
    assert cfg.optim.weight_decay == 0.005 and cfg.lr_finder.sweep_weight_decay == 0.05
    assert cfg.lr_finder.sweep == pytest.approx([0.001 + 0.0019 * k for k in range(10)])
    cfg = tiny_config(synthetic, tmp_path, **{"run.name": "seed_sweep", "lr_finder.method": "epochs",
                                              "lr_finder.sweep_weight_decay": 0.05, "lr_finder.sweep_images": 128})
    result = find_lr(cfg, log=lambda _: None)
    assert result["weight_decay"] == 0.05 and result["config"]["optim"]["weight_decay"] == 0.05
    assert [r["lr"] for r in result["seed_sweep"]] == [r["lr"] for r in result["sweep"]]
    assert len(result["sweep"]) == 10


def test_a_second_test_under_one_name_is_refused_unless_overwritten(synthetic, tmp_path):
    cfg = tiny_config(synthetic, tmp_path, **{"run.name": "lr", "lr_finder.steps": 20, "lr_finder.start_lr": 1e-3,
                                              "lr_finder.end_lr": 0.1, "lr_finder.diverge_factor": 1e6})
    find_lr(cfg, log=lambda _: None)
    with pytest.raises(FastCifarError, match="already holds an LR test \\(find_lr.json\\); choose another --name"):
        find_lr(cfg, log=lambda _: None)
    assert len(find_lr(cfg.override({"run.overwrite": True}), log=lambda _: None)["lrs"]) == 20
