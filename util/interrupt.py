"""Stopping a run cleanly on SIGTERM (preemption, ``scancel``, torchrun passing a signal on) and
SIGINT (Ctrl-C).

While ``StopSignals`` is active a signal only records itself; training and evaluation look at it
at their next safe point (the end of a logging window, where they synchronise anyway, and
between epochs) and raise ``RunInterrupted``. main.py then releases the output directory's lock
and exits with the conventional status 128 + signal number, keeping the last complete checkpoint.
A second signal of the same kind is obeyed at once (the user insists).
"""
import os
import signal
import threading
from typing import Dict, Optional

import torch

from util.dist import is_dist_avail_and_initialized

HANDLED = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """A stop asked for by a signal, raised at a safe point. ``where``: what was cut short."""

    def __init__(self, signum: int, where: str):
        self.signum, self.where = signum, where
        super().__init__(f"{signal.Signals(signum).name} during {where}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: SIGTERM / SIGINT set ``signum`` instead of killing the process.

    Only the main thread can install handlers; elsewhere (or if handlers cannot be set) it does
    nothing and the signals keep their usual effect.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # a second signal: give up on the safe point
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        """Whether a signal arrived in this process. No collective: for a pass that runs on one rank
        only (the reference diagnostics, the pictures), which stops early and leaves the decision
        to the next ``check`` that every rank reaches."""
        return self.signum is not None

    def check(self, where: str, device: torch.device) -> None:
        """Raise ``RunInterrupted`` if a signal arrived here or, in a distributed run, on any rank.

        Distributed: a collective, so every rank must call it at the same point (they then all stop
        there together instead of one rank leaving the others waiting in the next collective).
        """
        signum = self.signum or 0
        if is_dist_avail_and_initialized():
            flag = torch.tensor([signum], dtype=torch.long, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            raise RunInterrupted(signum, where)


def ignore_stop_signals() -> None:
    """For data-loader workers: the main process decides when to stop (a worker killed by the
    terminal's Ctrl-C or by ``scancel`` would otherwise fail the next batch with a traceback)."""
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_IGN)
