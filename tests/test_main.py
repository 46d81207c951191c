"""`python -m fastcifar <command>`: one command that lists the others and hands over to them."""

import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar.__main__ import COMMANDS, main

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
