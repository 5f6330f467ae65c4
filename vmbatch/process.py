"""The one way vmbatch runs an external command.

Hooks run with no ``PATH``, so every program is given by absolute path (from the config).
Every call has a timeout; a command that overruns is killed with its whole process group so
nothing it started lingers. Failures become :class:`~vmbatch.errors.CommandError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbatch.errors import CommandError, CommandTimeoutError

log = logging.getLogger(__name__)

#: Environment for child processes: hooks inherit almost nothing, so give a sane minimum.
_BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


@dataclass(frozen=True, slots=True)
class Result:
    """What a finished command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
    stderr_path: Path | None = None,
    umask: int | None = None,
) -> Result:
    """Run ``argv`` (``argv[0]`` absolute) and return its result.

    Raises :class:`CommandTimeoutError` after ``timeout`` seconds (the process group is
    killed), and :class:`CommandError` when the program is missing or, with ``check``, exits
    non-zero. The error message carries the last line of stderr, which is usually the cause.
    With ``stderr_path`` stderr goes to that file instead of a pipe (for programs that leave
    a daemon behind holding it, such as ``guestfish --listen``) and is read back from it.
    With ``umask`` the child starts with that file-mode creation mask (umask(2)), so what it
    creates has no more than the mask allows from the moment it exists: a ``chmod`` after
    the command returns would leave a window in which others can open the file and keep the
    handle. Popen applies it in the child between fork and exec, without a ``preexec_fn``
    (https://docs.python.org/3/library/subprocess.html#subprocess.Popen).
    """
    args = tuple(str(a) for a in argv)
    if not Path(args[0]).is_absolute():
        raise CommandError(
            f"refusing to run {args[0]!r}: programs must be given by absolute path",
            hint="set the full path in the [tools] section of the configuration",
        )
    child_env = dict(_BASE_ENV)
    if env:
        child_env.update(env)
    log.debug("running %s (timeout %.0fs)", " ".join(args), timeout)
    try:
        with contextlib.ExitStack() as stack:
            errfile = (
                stack.enter_context(stderr_path.open("w")) if stderr_path is not None else None
            )
            proc = subprocess.Popen(  # noqa: S603 - argv is a list from our own code, no shell
                args,
                stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errfile if errfile is not None else subprocess.PIPE,
                text=True,
                env=child_env,
                start_new_session=True,
                umask=-1 if umask is None else umask,
            )
    except OSError as exc:
        raise CommandError(
            f"cannot run {args[0]}: {exc.strerror}",
            hint="install it or fix its path in the [tools] section of the configuration",
        ) from exc
    try:
        out, err = proc.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        raise CommandTimeoutError(
            f"{Path(args[0]).name} did not finish within {timeout:.0f}s and was killed",
            hint="the host may be overloaded or the file system hung",
        ) from exc
    except BaseException:
        _kill_group(proc)
        raise
    if stderr_path is not None:
        err = stderr_path.read_text(errors="replace")
    if check and proc.returncode != 0:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit status {proc.returncode}"
        raise CommandError(
            f"{Path(args[0]).name} failed: {last}",
            returncode=proc.returncode,
            stderr=err,
        )
    return Result(args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the command and everything it started (it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
