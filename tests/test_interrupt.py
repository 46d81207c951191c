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
