"""SIGINT/SIGTERM/SIGHUP as exceptions, with sections where they must wait.

While a job's VM is being prepared or used, a termination signal raises
:class:`~vmbatch.errors.JobInterruptedError` in the main thread, which unwinds into teardown.
Some steps must not be cut in half: between ``createXML`` returning and us recording the
domain name, an exception would leak a running VM. Inside :func:`deferred` a signal is only
noted and raised when the section ends. Teardown runs inside ``deferred`` as a whole, so a
second Ctrl-C cannot interrupt the clean-up of the first.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType

from vmbatch.errors import JobInterruptedError

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _State:
    defer = 0
    pending: int | None = None


_STATE = _State()


def _handler(signum: int, _frame: FrameType | None) -> None:
    if _STATE.defer > 0:
        _STATE.pending = signum
        return
    raise JobInterruptedError(signum)


def _main_thread() -> bool:
    """Python runs signal handlers in the main thread only, and only it may set them. Another
    thread (a test running several jobs at once) leaves the process's handlers as they are:
    the blocks below then change nothing there."""
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn termination signals into JobInterruptedError for the duration of the block."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold termination signals until the block ends, then raise the one that came."""
    _STATE.defer += 1
    try:
        yield
    finally:
        _STATE.defer -= 1
    if _STATE.defer == 0 and _STATE.pending is not None:
        signum, _STATE.pending = _STATE.pending, None
        raise JobInterruptedError(signum)


class Pending:
    """Signals received inside :func:`forwarded`, in order, until taken."""

    def __init__(self) -> None:
        self._signals: list[int] = []

    def add(self, signum: int) -> None:
        self._signals.append(signum)

    def take(self) -> list[int]:
        taken, self._signals = self._signals, []
        return taken


@contextmanager
def forwarded(which: Iterable[int]) -> Iterator[Pending]:
    """Record ``which`` signals instead of acting on them, for the caller to forward.

    Used while a job runs in its guest: the job, not vmbatch, decides what SIGTERM means;
    the caller polls :meth:`Pending.take`. Previous handlers come back afterwards.
    """
    pending = Pending()
    if not _main_thread():
        yield pending
        return
    previous = {s: signal.getsignal(s) for s in which}
    for s in which:
        signal.signal(s, lambda signum, _frame: pending.add(signum))
    try:
        yield pending
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _JobControl:
    continued = 0


_JOB_CONTROL = _JobControl()


def continued() -> int:
    """How often this process was continued (SIGCONT) inside :func:`job_control`."""
    return _JOB_CONTROL.continued


def _stop_now(_signum: int, _frame: FrameType | None) -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def _count_continue(_signum: int, _frame: FrameType | None) -> None:
    _JOB_CONTROL.continued += 1


@contextmanager
def job_control() -> Iterator[None]:
    """Stop at once on SIGTSTP, and count each SIGCONT, for the duration of the block.

    A scheduler suspends a job with SIGTSTP, then SIGSTOP a fixed time later (Slurm 22.05:
    2 s, ``slurmstepd/req.c:_handle_suspend``; Torque 6.1: 5 s,
    ``resmom/requests.c:resume_suspend``), and continues it with SIGCONT. The job starter
    stops itself on the SIGTSTP, so the node agent (:mod:`vmbatch.agent`), which pauses
    the VM of a job whose starter is stopped, does so at once; on Torque, whose job
    session is an orphaned process group, the kernel would otherwise discard the SIGTSTP.
    SIGCONT is counted: the time a process spent stopped still passes on
    ``time.monotonic()``, so timeouts that span a stop are started again (:class:`Session`).
    """
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTSTP, signal.SIGCONT)}
    signal.signal(signal.SIGTSTP, _stop_now)
    signal.signal(signal.SIGCONT, _count_continue)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
