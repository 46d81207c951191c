import os
import signal

import pytest

from fastcifar.errors import run_cli
from fastcifar.interrupt import StopSignals, TrainingInterrupted


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_sets_the_flag_second_one_aborts(sig):
    before = signal.getsignal(sig)
    with StopSignals() as stop:
        assert not stop()
        os.kill(os.getpid(), sig)
        assert stop() and stop.signum == sig
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before  # handlers put back


def test_interruption_exits_with_128_plus_the_signal(capsys):
    def action():
        raise TrainingInterrupted("stopped by SIGTERM after epoch 1; Continue with: ...", signal.SIGTERM)

    assert run_cli(action) == 143
    assert capsys.readouterr().err.startswith("error: stopped by SIGTERM")


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler, also where the suite inherits an ignored SIGINT (a job started with `&`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_outside_training_stops_a_command_with_one_line(sig, code, capsys, python_sigint):
    before = signal.getsignal(signal.SIGTERM)

    def action():  # e.g. the ablation runner writing its report when `timeout` sends SIGTERM
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not stop the action")

    assert run_cli(action, interrupted="stopped; rerun to continue") == code
    assert capsys.readouterr().err == "stopped; rerun to continue\n"
    assert signal.getsignal(signal.SIGTERM) is before  # handler put back


def test_training_keeps_its_own_handling_of_sigterm_inside_a_command():
    def action():
        with StopSignals() as stop:  # as training does: the flag, not an exception, then the handler of run_cli
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)

    assert run_cli(action) == 0
