"""The presets: named overrides on the one base config, each naming itself; `reference` is the seed's code."""

import ast
from pathlib import Path

import pytest

from fastcifar.config import Config, ConfigError
from fastcifar.presets import DEFAULT_PRESET, PRESETS


def _differing(a: Config, b: Config) -> set[tuple[str, str]]:
    da, db = a.to_dict(), b.to_dict()
    return {(s, k) for s, sec in da.items() if isinstance(sec, dict) for k in sec if sec[k] != db[s][k]}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_names_itself(name):
    assert Config.from_preset(name).preset == name  # derived ones (fast10, reference_as_ran, smoke) too


def test_the_base_is_the_default_preset():
    assert Config() == Config.from_preset(DEFAULT_PRESET) and PRESETS[DEFAULT_PRESET] == {}
    assert Config().preset == DEFAULT_PRESET


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'fastest'; choose one of: fast12, fast, fast10"):
        Config.from_preset("fastest")


def test_presets_are_data_and_import_nothing_from_the_package():
    """config.py reads this module; an import back would be a cycle."""
    tree = ast.parse(Path(__file__).resolve().parents[1].joinpath("fastcifar", "presets.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("fastcifar")}


def test_reference_is_the_seeds_code():
    """The values of the seed's notebook and wrapper (config.yaml at 501ad8c), not of its README table."""
    cfg = Config.from_preset("reference")
    assert cfg.schedule.epochs == 24 and cfg.data.batch_size == 512
    assert (cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.9, False, 0.005)
    assert (cfg.schedule.min_lr, cfg.schedule.max_lr, cfg.schedule.end_lr) == (0.002, 0.02, -1)
    # OneCycleLR(pct_start=0.167) over 24 x 98 steps peaks at step 0.167 * 2352 - 1
    assert cfg.schedule.peak_epoch == pytest.approx((0.167 * 24 * 98 - 1) / 98, abs=1e-3)
    assert cfg.model.widths == (64, 128, 256, 512) and cfg.optim.label_smoothing == 0
    assert (cfg.model.logit_scale, cfg.model.whiten_init, cfg.model.bn_weight_frozen) == (1.0, False, False)
    assert (cfg.optim.bn_lr_scale, cfg.optim.bn_wd_scale, cfg.optim.bn_weight_decay) == (1.0, 1.0, True)
    d = cfg.data
    assert (d.crop_padding, d.pad_mode, d.flip, d.flip_mode, d.test_flip) == (4, "reflect", True, "random", False)
    assert (d.cutout_size, d.cutout_place, d.cutout_max_holes, d.cutout_p) == (8, "inside", 1, 1.0)
    assert cfg.lr_finder.sweep_weight_decay == 0.05  # its LR finder's own weight decay


def test_reference_as_ran_differs_from_reference_by_the_seeds_augmentation_only():
    ran = Config.from_preset("reference_as_ran")
    assert _differing(Config.from_preset("reference"), ran) == {
        ("data", "flip_mode"), ("data", "cutout_max_holes"), ("data", "cutout_p")}
    assert (ran.data.flip_mode, ran.data.cutout_max_holes, ran.data.cutout_p) == ("always", 3, 0.8)


@pytest.mark.parametrize(("name", "epochs"), [("fast10", 10), ("fast16", 16)])
def test_short_fast_presets_are_fast_with_the_peak_at_the_same_fraction(name, epochs):
    fast, short = Config.from_preset("fast"), Config.from_preset(name)
    assert _differing(fast, short) == {("schedule", "epochs"), ("schedule", "peak_epoch")}
    assert short.schedule.epochs == epochs
    assert short.schedule.peak_epoch / epochs == pytest.approx(fast.schedule.peak_epoch / 24, abs=1e-3)


def test_the_default_fast12_is_fast_in_12_epochs_at_a_higher_lr_less_smoothing_tested_once():
    fast, fast12 = Config.from_preset("fast"), Config()
    assert fast12.preset == "fast12" and DEFAULT_PRESET == "fast12"
    assert _differing(fast, fast12) == {
        ("schedule", "epochs"), ("schedule", "peak_epoch"), ("schedule", "min_lr"), ("schedule", "max_lr"),
        ("optim", "label_smoothing"), ("data", "test_translate"), ("run", "test_every")}
    assert (fast12.schedule.epochs, fast12.schedule.max_lr, fast12.optim.label_smoothing) == (12, 0.6, 0.1)
    assert fast12.schedule.peak_epoch / 12 == pytest.approx(fast.schedule.peak_epoch / 24, abs=1e-3)
    assert fast12.schedule.min_lr / fast12.schedule.max_lr == fast.schedule.min_lr / fast.schedule.max_lr
    # one test pass, at the end, with flip and +-1 px translation TTA
    assert (fast12.run.test_every, fast12.data.test_flip, fast12.data.test_translate) == (0, True, 1)


def test_fast_carries_the_levers_measured_at_full_length():
    cfg = Config.from_preset("fast")  # candidate B + alternating flips (docs/experiments.md)
    assert (cfg.model.whiten_init, cfg.model.whiten_frozen, cfg.model.bn_weight_frozen) == (True, True, True)
    assert (cfg.optim.bn_lr_scale, cfg.optim.bn_wd_scale, cfg.data.flip_mode) == (64.0, 1 / 64, "alternate")
    assert (cfg.schedule.max_lr, cfg.schedule.end_lr, cfg.optim.nesterov, cfg.data.test_flip) == (0.4, 0, True, True)
    schedule, data = cfg.schedule, cfg.data
    assert (schedule.epochs, cfg.optim.label_smoothing, data.test_translate, cfg.run.test_every) == (24, 0.2, 0, 1)


def test_smoke_is_the_reference_recipe_made_tiny():
    smoke, ref = Config.from_preset("smoke"), Config.from_preset("reference")
    assert {s for s, _ in _differing(ref, smoke)} <= {"data", "model", "schedule", "run"}
    assert smoke.model.widths == (8, 16, 32, 64) and smoke.optim == ref.optim
