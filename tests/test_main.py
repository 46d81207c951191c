"""`python -m fastcifar <command>`: one command that lists the others and hands over to them; and every command
tried with generated options."""

import argparse
import contextlib
import importlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcifar.__main__ import COMMANDS, main
from fastcifar.calibrate import Choice
from fastcifar.inference import Predictions
from tests.conftest import tiny_cli_args
from tests.test_cli import TYPED

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("prepare", "train", "evaluate", "report", "find-lr", "seeds", "compare", "bench"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split(maxsplit=1)[1]) > 10, line  # a description beside it


def test_no_command_is_a_usage_error_that_shows_the_list(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_an_unknown_command_is_one_line_naming_the_commands(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'trian'; choose one of: prepare, train," in err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_answers_help_under_its_new_name(name, capsys):
    try:
        code = main([name, "--help"])
    except SystemExit as done:  # argparse's own exit, where a command lets it through
        code = done.code
    assert code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m fastcifar {name}")


def test_options_reach_the_command(capsys):
    assert main(["train", "--epochs", "0"]) == 2  # the train command's own check, in its own words
    assert "schedule.epochs must be in [1, 10000]" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_fastcifar_runs_it():
    proc = subprocess.run([sys.executable, "-m", "fastcifar", "--help"], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0 and "find-lr" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_help_into_a_closed_pipe_ends_quietly():
    proc = subprocess.run(f"{sys.executable} -m fastcifar --help | head -1", shell=True, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.stdout.startswith("usage: ") and "Traceback" not in proc.stderr, proc.stderr


# Every command, tried with generated options (Hypothesis). Each command's options are read from its own parser
# (no list kept here to drift); the values are what a user types (tests/test_cli.py's TYPED) and paths to real and
# broken inputs. The long work each command starts (the training loop, the data step, an evaluation's test pass, a
# calibration, the benchmarks) is replaced by a stand-in that counts its calls; every check before it runs for real
# (`train`: its whole set-up on the synthetic data, the device, memory, run folder and data checks included).
# The property: exit 0 having started the work once (or, for `report` and `compare`, which run for real, having
# written the report or printed the table), or a non-zero exit with one `error:` line and no work started. Never a
# traceback.

class _Parsed(Exception):
    """Raised in place of parsing: the command's parser is caught before it reads anything."""


def command_parser(name: str) -> argparse.ArgumentParser:
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise _Parsed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with contextlib.suppress(_Parsed):
            main([name])
    return caught[0]


def _options(name: str) -> list[tuple[str, bool]]:
    """(flag, takes no value) for each option of the command but --help."""
    return [(action.option_strings[0], action.nargs == 0) for action in command_parser(name)._actions
            if action.option_strings and not isinstance(action, argparse._HelpAction)]


def _predictions(*args, **kwargs) -> Predictions:
    labels = np.arange(20) % 10
    return Predictions(np.eye(10, dtype=np.float32)[labels], labels, np.zeros((0, 32, 32, 3), np.uint8),
                       np.zeros(0, np.int64))


STAND_INS = {  # command -> the functions that do its work, and what each stand-in returns
    "prepare": {"fastcifar.prepare.prepare": {}},
    "train": {"fastcifar.training._train": None},  # after Session.open: the device, memory, folder and data checks
    "evaluate": {"fastcifar.evaluation.open_split": None, "fastcifar.evaluation.predict": _predictions},
    "report": {},
    "find-lr": {"fastcifar.lr_finder.find_lr": {}},
    "seeds": {"fastcifar.multiseed.run_seeds": None},
    "compare": {},
    "calibrate": {"fastcifar.calibrate.choose": Choice("fp32", False, "library", False, "given", "stand-in")},
    "bench": {"benchmarks.run.run": {"machine": {"device": "cpu"}}, "benchmarks.run.markdown": "stand-in",
              "benchmarks.run.training_precision": torch.bfloat16},  # (a calibration, for the default variants)
}
WORK = {name: next(iter(stand_ins), None) for name, stand_ins in STAND_INS.items()}  # the call that is the work
EXAMPLES = {"train": 30, "report": 20, "compare": 30}  # train: tests/test_cli.py has 300 more; report draws figures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A finished run (hand-made) and a model.pt of the tiny network, to be named among the generated values."""
    from fastcifar.config import Config
    from fastcifar.custom_resnet import CustomResNet
    from fastcifar.rundir import save_checkpoint
    from tests.test_runfiles import make_run

    run = make_run(tmp_path_factory.mktemp("inputs") / "run")
    cfg = Config.from_preset("reference", {"model.widths": "4,8,8,16"})
    save_checkpoint(run / "model.pt", {"model": CustomResNet(cfg.model).state_dict(), "config": cfg.to_dict(),
                                       "epoch": 1})
    return run


def _first_args(name: str, run: Path, synthetic: dict) -> st.SearchStrategy:
    """The start of a valid command line (what is required), each part sometimes a broken or generated value."""
    if name == "train":  # the tiny network on the synthetic data, its runs in the example's own folder
        return st.just(tiny_cli_args(synthetic, Path("runs")))
    path = st.sampled_from([str(run), str(run / "model.pt"), str(run / "nothing"), str(run / "results.json")])
    value = path | TYPED
    if name in ("report", "compare"):
        return st.lists(value, min_size=1, max_size=2 if name == "compare" else 1)
    if name == "evaluate":
        return st.tuples(st.just("--checkpoint"), st.just(str(run / "model.pt")) | value).map(list)
    if name == "seeds":
        return st.tuples(st.just("--seeds"), st.sampled_from(["2", "0,3"]) | TYPED).map(list)
    return st.just([])


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_takes_generated_options_or_refuses_them_in_one_line(name, inputs, synthetic, tmp_path_factory,
                                                                         monkeypatch):
    options = _options(name)
    calls: list[str] = []
    for target, result in STAND_INS[name].items():
        module, _, attribute = target.rpartition(".")
        def stand_in(*args, _target=target, _result=result, **kwargs):
            calls.append(_target)
            return _result(*args, **kwargs) if callable(_result) else _result
        monkeypatch.setattr(importlib.import_module(module), attribute, stand_in)
    threads = torch.get_num_threads()

    @settings(max_examples=EXAMPLES.get(name, 40), deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(first=_first_args(name, inputs, synthetic),
           picked=st.lists(st.tuples(st.sampled_from(options), TYPED), max_size=3) if options else st.just([]))
    def attempt(first, picked):
        argv = [name, *first]
        for (flag, bare), value in picked:
            argv += [flag] if bare else [flag, value]
        calls.clear()
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out, \
                contextlib.redirect_stderr(io.StringIO()) as err:
            patch.chdir(tmp_path_factory.mktemp(name.replace("-", "")))  # anything written stays in a fresh folder
            try:
                code = main(argv)
            except SystemExit as done:  # argparse's usage errors leave from parse_args
                code = done.code
            finally:
                torch.set_num_threads(threads)  # calibrate --run.threads sets the process's threads
        err_lines = err.getvalue().strip().splitlines()
        work = WORK[name]
        if code == 0:
            if work is not None:
                assert calls.count(work) == 1, (argv, calls, err.getvalue())
            elif name == "report":
                assert (Path(first[0]) / "summary.md").is_file(), argv
            else:
                assert out.getvalue().count("\n|") >= 2, (argv, out.getvalue())
        else:
            assert code in (1, 2), (argv, code, err.getvalue())
            assert len(err_lines) == 1 and err_lines[0].startswith("error: "), (argv, err.getvalue())
            assert work is None or work not in calls, (argv, calls)

    attempt()


@pytest.mark.parametrize("argv", [["compare", "--table", "\x00"], ["compare", "run", "--out", "a\x00.png"],
                                  ["report", "\r"], ["evaluate", "--checkpoint", "\x00"], ["train", "--resume", "a\nb"],
                                  ["calibrate", "--save", "\x00"], ["bench", "--markdown", "\x00"]])
def test_a_path_with_a_nul_or_a_line_break_is_one_usage_line(argv, capsys):
    """Found by the property above: a NUL in a path reached the OS (`ValueError: embedded null byte`)."""
    try:
        code = main(argv)
    except SystemExit as done:  # argparse's usage error, where a command lets it through
        code = done.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "must be printable text" in err, err
