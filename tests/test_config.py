import json
import re

import pytest

from fastcifar.cli import add_config_arguments, config_from_args
from fastcifar.config import DEFAULT_PRESET, PRESETS, SECTIONS, Config, ConfigError, all_keys
from fastcifar.training import build_parser


@pytest.mark.parametrize(("key", "text", "expected"), [
    ("schedule.epochs", "30", 30),
    ("schedule.max_lr", "0.1", 0.1),
    ("optim.nesterov", "true", True),
    ("optim.nesterov", "off", False),
    ("model.widths", "8,16,32,64", (8, 16, 32, 64)),
    ("run.device", "cpu", "cpu"),
])
def test_override_parses_strings_to_field_types(key, text, expected):
    section, name = key.split(".")
    assert getattr(getattr(Config().override({key: text}), section), name) == expected


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("schedule.epochs", 0, "epochs must be in [1, 10000]"),
    ("schedule.epochs", "1" + "0" * 400, "epochs must be in [1, 10000], got 1000"),
    ("run.threads", 100000, "run.threads must be in [0, 1024]"),
    ("data.num_workers", 100000, "data.num_workers must be in [0, 64]"),
    ("data.batch_size", 100_000_000, "data.batch_size must be in [1, 50000]"),
    ("schedule.max_lr", 1e308, "schedule.max_lr must be in [1e-09, 1000000.0]"),
    ("schedule.min_lr", 1e-308, "schedule.min_lr must be in [1e-09, 1000000.0]"),
    ("data.batch_size", True, "data.batch_size must be a number (int), got bool True"),
    ("run.name", 5, "run.name must be a string, got int 5"),
    ("optim.nesterov", 1, "optim.nesterov must be true or false, got int 1"),
    ("schedule.peak_epoch", 30, "peak_epoch"),
    ("schedule.min_lr", 1.0, "min_lr <= schedule.max_lr"),
    ("data.pad_mode", "wrap", "pad_mode"),
    ("model.widths", "1,2,3", "4 integers in [1, 4096]"),
    ("run.device", "tpu", "run.device"),
    ("run.precision", "fp8", "run.precision"),
    ("schedule.epochs", "many", "cannot read 'many' as int"),
    ("optim.nesterov", "maybe", "as bool"),
    ("schedule.epochs", 2.5, "as int"),
    ("optim.nesterov_momentum", 1, "unknown option 'optim.nesterov_momentum'"),
    ("training.lr", 1, "unknown config section 'training'"),
    ("schedule.max_lr", "inf", "schedule.max_lr must be a finite number"),
    ("optim.weight_decay", float("inf"), "optim.weight_decay must be a finite number"),
    ("run.seed", 99999999999, "run.seed must be in "),
    ("run.name", "x" * 300, "run.name must be a plain directory name of at most 200 characters"),
    ("model.num_classes", 5, "model.num_classes must be 10"),
    ("data.loader", "dali", "data.loader must be auto, ffcv or resident"),
    ("model.ghost_batch", -1, "model.ghost_batch must be in [0, 50000]"),
    ("run.name", "a\x00b", "run.name must be printable text of at most 4096 characters (no NUL"),  # os: embedded NUL
    ("data.data_dir", "data\nmore", "data.data_dir must be printable text"),
    ("run.out_dir", "r" * 5000, "run.out_dir must be printable text of at most 4096 characters"),
])
def test_invalid_values_are_rejected_with_the_field_named(key, value, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Config().override({key: value})


def test_ghost_batch_norm_and_sync_bn_are_refused_together():
    assert Config().override({"model.ghost_batch": 32}).model.ghost_batch == 32
    with pytest.raises(ConfigError, match="model.ghost_batch and run.sync_bn exclude each other"):
        Config().override({"model.ghost_batch": 32, "run.sync_bn": True})


def test_dict_round_trip_and_unknown_keys():
    cfg = Config.from_preset("smoke", {"optim.weight_decay": 1e-3})
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown option 'data.colour'"):
        Config.from_dict({"data": {"colour": 1}})


def test_cli_short_and_dotted_flags_map_onto_the_config():
    args = build_parser().parse_args(["--preset", "smoke", "--epochs", "3", "--batch-size", "64", "--max-lr", "0.2",
                                      "--optim.weight_decay", "1e-3", "--run.channels_last", "false", "--overwrite"])
    cfg = config_from_args(args)
    assert (cfg.schedule.epochs, cfg.data.batch_size, cfg.schedule.max_lr) == (3, 64, 0.2)
    assert cfg.optim.weight_decay == 1e-3 and cfg.run.channels_last == "off" and cfg.run.overwrite is True
    assert cfg.model.widths == Config.from_preset("smoke").model.widths  # untouched fields keep the preset's values


def test_cli_without_a_preset_and_config_share_one_default():
    assert config_from_args(build_parser().parse_args([])) == Config() == Config.from_preset(DEFAULT_PRESET)
    assert config_from_args(build_parser().parse_args(["--preset", "reference"])) == Config.from_preset("reference")
    shown = build_parser().format_help()
    assert f"(default: {Config().schedule.max_lr})" in shown  # help shows the default preset's values


def test_resume_rejects_any_explicit_preset():
    base = Config.from_preset("smoke")
    assert config_from_args(build_parser().parse_args(["--epochs", "3"]), base=base).schedule.epochs == 3
    for name in PRESETS:  # also the default's own name: the run's config decides, not a preset
        with pytest.raises(ConfigError, match="--resume takes the run's own config"):
            config_from_args(build_parser().parse_args(["--preset", name]), base=base)


def test_cli_rejects_unknown_options(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--optim.lr", "0.1"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --optim.lr" in capsys.readouterr().err


def test_every_field_has_a_dotted_flag_and_each_command_shows_the_ones_it_uses():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, tuple(SECTIONS))
    flags = {s for action in parser._actions for s in action.option_strings}
    assert all(f"--{key}" in flags for key in all_keys())
    training = {s for action in build_parser()._actions for s in action.option_strings}
    assert not any(flag.startswith("--lr_finder.") for flag in training)  # training does not read them
    assert {f"--{key}" for key in all_keys() if not key.startswith("lr_finder.")} <= training


def test_training_refuses_the_lr_finders_fields(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--lr_finder.steps", "5"])
    assert exc.value.code == 2 and "unrecognized arguments: --lr_finder.steps" in capsys.readouterr().err


def test_config_file_is_a_starting_point(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(Config.from_preset("smoke", {"run.seed": 7}).to_dict()))
    cfg = config_from_args(build_parser().parse_args(["--config", str(path), "--epochs", "1"]))
    assert (cfg.preset, cfg.run.seed, cfg.schedule.epochs) == ("smoke", 7, 1)


def test_every_field_has_a_help_text_and_help_shows_it():
    import dataclasses

    from fastcifar.config import SECTIONS

    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help text"
    shown = build_parser().format_help()
    assert "frozen BN scales" in shown.replace("\n", " ") or "BatchNorm scales fixed at 1" in shown.replace(
        "\n", " ")


def test_an_unknown_option_is_one_line_not_a_usage_block(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--optim.lr", "0.1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: unrecognized arguments")
