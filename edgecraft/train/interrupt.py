"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM ends the current step, checkpoints, exits 130.

Stopping between steps (not wherever KeyboardInterrupt lands) means a checkpoint never holds
half of an optimizer update. SIGTERM is what torchrun, schedulers and `kill` send, and torchrun
forwards a terminal's Ctrl-C to every rank as SIGINT; both mean the same here.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from edgecraft.errors import UserError

INTERRUPTED = 130  # the shell's code for "stopped by Ctrl-C"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Set by the first signal; the loop checkpoints at the next step boundary and stops.

    A second signal interrupts at once, without a checkpoint. `quiet` (DDP ranks other than 0)
    keeps the notice to rank 0, which prints for the whole run.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.set = False
        self.quiet = quiet

    def __call__(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        if not self.quiet:
            print("\nCtrl-C: saving a checkpoint after this step (press again to quit now)", file=sys.stderr)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn a KeyboardInterrupt into one clean line and exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        raise UserError("interrupted", exit_code=INTERRUPTED) from None


@contextlib.contextmanager
def signals_to(flag: StopFlag) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `flag` inside the block, restoring the old handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, flag) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
