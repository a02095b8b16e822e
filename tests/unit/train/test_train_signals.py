"""GracefulExit: a real SIGTERM/SIGINT sets the flag; handlers are restored; second SIGINT interrupts."""

import os
import signal

import pytest

from udmtrain.train.signals import GracefulExit


def test_signal_sets_flag_and_restores_handlers():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with GracefulExit() as stop:
        assert not stop.should_exit()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_exit() and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGINT) is before_int
