"""The one way vmbatch runs an external command.

Hooks run with no ``PATH``, so every program is given by absolute path (from the config).
Every call has a timeout; a command that overruns is killed with its whole process group so
nothing it started lingers. Failures become :class:`~vmbatch.errors.CommandError`.

A command that leaves a daemon behind (``guestfish --listen``) outlives that timeout and,
if vmbatch itself is SIGKILLed (a batch system's prologue timeout), vmbatch's clean-up too.
Such commands get a random tag in their environment (:data:`TAG_VAR`, :func:`new_tag`),
which every process they start inherits through fork and exec whatever session, process
group or parent it ends up with; :func:`kill_tagged` finds them all by it later, from any
process (proc(5) ``/proc/PID/environ``), and kills them through pidfds so that a PID reused
in the meantime is never signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbatch import state
from vmbatch.errors import CommandError, CommandTimeoutError, HostError

log = logging.getLogger(__name__)

#: Environment for child processes: hooks inherit almost nothing, so give a sane minimum.
_BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
#: Environment variable that marks a command and everything it starts (:func:`kill_tagged`).
TAG_VAR = "VMBATCH_TAG"
#: What :func:`new_tag` makes: 128 random bits, hex.
TAG_PATTERN = re.compile(r"[0-9a-f]{32}")


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


def new_tag() -> str:
    """A fresh tag for ``env={TAG_VAR: tag}``: random, so no other process carries it."""
    return secrets.token_hex(16)


def _tag_entry(tag: str) -> bytes:
    if not TAG_PATTERN.fullmatch(tag):
        raise ValueError(f"not a process tag: {tag!r}")
    return f"{TAG_VAR}={tag}".encode()


def _carries(pid: int, entry: bytes) -> bool:
    """Whether process ``pid`` is ours (same effective uid) and its environment has ``entry``.

    A zombie has no environment any more: it is dead and counts as gone.
    """
    proc = Path(f"/proc/{pid}")
    try:
        if proc.stat().st_uid != os.geteuid():
            return False
        return entry in (proc / "environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def tags_in_use(required: Mapping[str, str]) -> dict[str, list[int]]:
    """Every tag carried by a live process of ours (same effective uid) whose environment
    also holds each ``required`` entry, with the PIDs carrying it.

    The reaper's view of injection appliances (``required``: the libguestfs cache directory
    of its configuration, so that another configuration's appliances are not its own).
    """
    prefix = f"{TAG_VAR}=".encode()
    needed = {f"{k}={v}".encode() for k, v in required.items()}
    me, uid = os.getpid(), os.geteuid()
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:  # gone, or not ours to read
            continue
        if not needed <= env:
            continue
        for item in env:
            tag = item[len(prefix) :].decode(errors="replace") if item.startswith(prefix) else ""
            if TAG_PATTERN.fullmatch(tag):
                found.setdefault(tag, []).append(int(entry.name))
    return found


def kill_identified(pid: int, identity: str, *, timeout: float) -> bool:
    """SIGKILL process ``pid`` if it still is the process ``identity`` names
    (:func:`vmbatch.state.process_identity`); wait up to ``timeout`` seconds for it to die.

    Returns False if it was gone (or its PID reused) before the signal. The pidfd is opened
    first and the identity checked after, so the signal can only reach the process that
    was checked. Raises :class:`HostError` if it is still alive after ``timeout``.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if state.process_identity(pid) != identity:
            return False
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        if not select.select([fd], [], [], max(timeout, 0.0))[0]:
            raise HostError(
                f"process {pid} is still alive {timeout:.0f}s after SIGKILL",
                hint="it is stuck in the kernel; check `ps -o pid,stat,wchan,cmd -p PID`",
            )
        return True
    finally:
        os.close(fd)


def tagged(tag: str) -> list[int]:
    """PIDs of the live processes (this process excepted) whose environment carries ``tag``."""
    entry = _tag_entry(tag)
    me = os.getpid()
    return sorted(
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and int(p.name) != me and _carries(int(p.name), entry)
    )


def _pidfd(pid: int, entry: bytes) -> int | None:
    """A pidfd for ``pid`` if it is still a live carrier of ``entry``, else None.

    The pidfd is opened first and the tag checked after: if the PID was reused in between,
    the check sees the new process (no tag: None) or the pidfd's process is already dead.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if not _carries(pid, entry):
        os.close(fd)
        return None
    return fd


def _wait_exited(fds: list[int], deadline: float) -> None:
    """Wait until every pidfd in ``fds`` reports its process's exit, or the deadline."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    pending = set(fds)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for fd, _ in poller.poll(left * 1000):
            pending.discard(fd)
            poller.unregister(fd)


def wait_exit(pid: int, tag: str, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for process ``pid`` to exit; True once it has.

    A process that no longer carries ``tag`` (gone, a zombie, or its PID reused) has exited.
    """
    fd = _pidfd(pid, _tag_entry(tag))
    if fd is None:
        return True
    try:
        return bool(select.select([fd], [], [], max(timeout, 0.0))[0])
    finally:
        os.close(fd)


def kill_tagged(tag: str, *, timeout: float) -> list[int]:
    """SIGKILL every process carrying ``tag`` and wait until all are dead; return their PIDs.

    Processes forked while this runs inherit the tag and are found by the next pass.
    Raises :class:`HostError` if some are still alive after ``timeout`` seconds (SIGKILL
    waits for a process stuck in the kernel, e.g. on hung storage).
    """
    entry = _tag_entry(tag)
    deadline = time.monotonic() + timeout
    killed: list[int] = []
    while pids := tagged(tag):
        if time.monotonic() >= deadline:
            raise HostError(
                f"processes {', '.join(map(str, pids))} ({TAG_VAR}={tag}) are still alive"
                f" {timeout:.0f}s after SIGKILL",
                hint="they are stuck in the kernel; check `ps -o pid,stat,wchan,cmd -p PID`",
            )
        fds: list[int] = []
        try:
            for pid in pids:
                fd = _pidfd(pid, entry)
                if fd is None:
                    continue
                fds.append(fd)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                if pid not in killed:
                    killed.append(pid)
            _wait_exited(fds, deadline)
        finally:
            for fd in fds:
                os.close(fd)
    return killed
