"""Signals: SIGTERM and SIGHUP (schedulers, `timeout`, `docker stop`) end a run like Ctrl-C, with cleanup."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: the signals that end a run cleanly: their handlers raise, so `finally` and `except` blocks clean up
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A run ended by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """Inside the block, SIGINT, SIGTERM and SIGHUP raise `Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in ENDING_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold the ending signals back until the block is done (renames that belong together, cleanup), then deliver them.

    Python runs signal handlers in the main thread whichever thread the kernel picked, so a handler that only
    records the signal defers it reliably (blocking it with pthread_sigmask would not: other threads may take it).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in ENDING_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
