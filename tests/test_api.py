"""The public API in fastcifar/__init__.py (the notebook and README snippets use exactly this)."""

import importlib
import json
import subprocess
import sys

import pytest

import fastcifar
from fastcifar.config import ConfigError


def test_every_public_name_resolves():
    for name in fastcifar.__all__:
        assert getattr(fastcifar, name) is not None, name


def test_train_find_lr_evaluate_are_functions_even_after_their_modules_load():
    importlib.import_module("fastcifar.training")
    from fastcifar.lr_finder import range_test  # noqa: F401  (loads the module the usual way)

    assert callable(fastcifar.train) and fastcifar.train.__module__ == "fastcifar.training"
    assert fastcifar.find_lr.__name__ == "find_lr" and fastcifar.evaluate.__name__ == "evaluate_checkpoint"


def test_the_api_names_stay_functions_after_the_command_modules_are_imported():
    for command in ("train", "find_lr", "evaluate"):
        module = importlib.import_module(f"fastcifar.{command}")
        assert callable(getattr(fastcifar, command)) and not isinstance(getattr(fastcifar, command), type(module))
    code = "import fastcifar.train, fastcifar.evaluate, fastcifar.find_lr, fastcifar; print(fastcifar.train.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "train"


def test_presets_take_short_keywords_section_keywords_and_dotted_keys():
    cfg = fastcifar.Config.from_preset("reference", {"optim.nesterov": True}, epochs=10, max_lr=0.2,
                                       optim__weight_decay=1e-3)
    assert (cfg.schedule.epochs, cfg.schedule.max_lr, cfg.optim.weight_decay, cfg.optim.nesterov) == \
        (10, 0.2, 1e-3, True)
    assert cfg.override(batch_size=256).data.batch_size == 256 and cfg.data.batch_size == 512


@pytest.mark.parametrize(("keywords", "fragment"), [({"epoch": 3}, "unknown keyword 'epoch'"),
                                                    ({"optim__nope": 1}, "unknown option 'optim.nope'"),
                                                    ({"epochs": 0}, "schedule.epochs must be in \\[1, 10000\\]")])
def test_bad_keywords_are_config_errors(keywords, fragment):
    with pytest.raises(ConfigError, match=fragment):
        fastcifar.Config.from_preset("reference", **keywords)


def test_lr_from_keyword_takes_the_suggestion(tmp_path):
    path = tmp_path / "find_lr.json"
    path.write_text(json.dumps({"suggestion": {"min_lr": 0.02, "max_lr": 0.2}}))
    cfg = fastcifar.Config.from_preset("reference", lr_from=str(path))
    assert (cfg.schedule.min_lr, cfg.schedule.max_lr, cfg.schedule.lr_from) == (0.02, 0.2, str(path))


def test_train_result_gives_metrics_model_and_predictions(tiny_run):
    preds = tiny_run.predictions()
    assert preds.accuracy == pytest.approx(tiny_run.metrics[-1]["test_acc"])
    assert len(tiny_run.metrics) == tiny_run.config.schedule.epochs and tiny_run.run_dir.is_dir()
    fig = fastcifar.plot_curves(tiny_run.metrics)
    assert fig.axes
