"""Run a job in the guest detached from the SSH connection, and follow it until it ends.

Why detached: a job may run for hours over a connection that can drop (busy node, guest
network hiccup, keepalive timeout). The job must go on meanwhile and its output must come
back whole, once. So the connection is only a window onto files in the guest:

1. **Upload** (one exec channel: a shell archive on stdin, every file base64-encoded in a
   quoted here-document, so no content is ever on a command line or read as syntax):
   ``supervisor.sh`` (:file:`vmbatch/guest/supervisor.sh`), ``start`` (the environment as
   ``export NAME='value'`` lines, quoted with :func:`shlex.quote`, then ``cd`` to the working
   directory, check that the script's ``#!`` interpreter exists in the guest, naming it and
   the image if not, and ``exec`` the job), ``job`` (the script, 0700) and ``stdin``, into
   ``/var/tmp/vmbatch-<job>`` (``-<job>.<step>`` for a Slurm step; 0700, the job user's;
   /var/tmp, not /tmp, which is a RAM tmpfs on some distributions and would hold all of
   the job's output in memory). ``stdin`` is empty, or a regular file's bytes uploaded
   first on their own channel (checked by count), or a named pipe that a second channel
   feeds from the host's pipe while the job runs; the supervisor holds the pipe open until
   the host marks the end of input (``stdin.eof``), so the job sees end of file then.
2. **Start**: ``sh supervisor.sh DIR WALLTIME GRACE`` starts the job with ``setsid`` (its
   own process group), redirects its stdout/stderr to files, writes its status when it ends
   and returns at once.
3. **Follow**: one channel runs ``tail -c +N -f`` on both files (stdout on the channel's
   stdout, stderr on its stderr) until the status file exists. The host counts the bytes it
   has written to its own outputs; after a drop it reconnects (``SSH_RECONNECT_POLICY``,
   as long as the domain runs) and follows again from those counts, so nothing is lost or
   repeated. Then a last channel sends what is left after the counts and exits with the
   job's status.
4. **Signals**: SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 received by the host side are
   sent to the job's process group (``kill -SIG -- -PGID`` as the job's user). After a
   terminating one, the group gets SIGKILL if it is still there ``kill_grace`` seconds later.

An interactive job (the host's stdin is a terminal: ``srun --pty``) is not detached:
:meth:`Session.attach` runs it on a pseudo-terminal in the guest, as ``ssh -t`` does.

The status is the shell's: the exit code, or 128+N after death by signal N. A guest that
stops while the job runs (crash, poweroff), or stops answering (checked by running ``true``
after ``liveness_interval`` of silence) for ``reconnect_timeout``, ends the job with
:class:`GuestLostError`.

Reconnecting: a login and the step it resumes are one attempt of ``SSH_RECONNECT_POLICY``.
A login whose connection is already closed, or a step that drops again before the guest
answered anything, is a failed attempt: the policy waits, backs off, and gives up after
``reconnect_timeout``. Only an answer from the guest (output, a liveness check, a command's
status) starts a new ``reconnect_timeout``, so a job that runs for days may lose its
connection any number of times, but a guest that accepts logins and then drops them (it is
crashing, or the job kills its own SSH sessions) cannot keep the host side busy forever.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import importlib.resources
import logging
import os
import re
import select
import shlex
import signal
import stat
import struct
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import paramiko

from vmbatch import signals
from vmbatch.errors import GuestConnectionError, GuestLostError, JobError
from vmbatch.retry import SSH_RECONNECT_POLICY

log = logging.getLogger(__name__)

#: Variables of the host side's environment never passed to the job: they describe the
#: host's session (agent socket, display, runtime dirs, per-job temp dir, Kerberos cache
#: file), which does not exist in the guest, or are set by the guest's own shell.
ENV_DENY = frozenset(
    {
        "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
        "SSH_ORIGINAL_COMMAND", "DISPLAY", "XAUTHORITY", "WAYLAND_DISPLAY",
        "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "XDG_SESSION_TYPE",
        "XDG_SESSION_CLASS", "XDG_SEAT", "XDG_VTNR", "HOSTNAME", "PWD", "OLDPWD", "SHLVL",
        "_", "TMPDIR", "KRB5CCNAME", "MAIL", "VMBATCH_CONFIG",
    }
)  # fmt: skip
#: Linux's limit for one "NAME=value" string at exec (MAX_ARG_STRLEN) and a safe total.
MAX_ENV_ENTRY = 128 * 1024
MAX_ENV_TOTAL = 1024 * 1024
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
TERMINATING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: What a dropped connection looks like from paramiko (and our own check).
_DROPS = (GuestConnectionError, paramiko.SSHException, OSError, EOFError)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class GuestJob:
    """What to run in the guest."""

    job_id: str
    script: bytes
    environment: Mapping[str, str] = field(default_factory=dict)
    #: Working directory in the guest; None: the user's home (the login directory).
    workdir: str | None = None
    #: Seconds (0: no limit), enforced inside the guest.
    walltime: int = 0
    kill_grace: float = 30.0
    #: Arguments for the script (``sbatch job.sh a b``, ``qsub -F "a b"``).
    args: tuple[str, ...] = ()
    #: A job step beside the job's main script (Slurm ``srun``: the step number or
    #: ``interactive``): its own directory in the guest. None: the job's script.
    step: str | None = None
    #: Put vmbatch's ``srun`` (:file:`vmbatch/guest/srun.sh`) first on the job's PATH: a
    #: Slurm job's steps started inside the VM run in that same VM.
    srun: bool = False
    #: The image the job asked for (its catalog name), named when the script's
    #: interpreter is missing in the guest; "": not known.
    image: str = ""


def command_script(argv: tuple[str, ...]) -> bytes:
    """A job script that runs ``argv`` exactly (``vmbatch run -- ARGV``, ``srun ARGV``),
    or says that the command is not in the VM (exit 127, as a shell does)."""
    cmd = shlex.quote(argv[0])
    return (
        "#!/bin/sh\n"
        f"command -v -- {cmd} >/dev/null 2>&1 || {{ printf 'vmbatch: %s: command not found"
        f" in the job'\\''s VM\\n' {cmd} >&2; exit 127; }}\n"
        f"exec {shlex.join(argv)}\n"
    ).encode()


def job_environment(env: Mapping[str, str], deny: frozenset[str] = ENV_DENY) -> dict[str, str]:
    """``env`` without the deny list and names sh cannot export; refuse what exec cannot take."""
    kept: dict[str, str] = {}
    for name, value in env.items():
        if name in deny:
            continue
        if not _NAME.fullmatch(name):
            log.warning("environment variable %r is not a shell name; not passed", name)
            continue
        if len(name) + len(value) + 1 > MAX_ENV_ENTRY:
            raise JobError(
                f"environment variable {name} is {len(value)} bytes; a Linux guest cannot"
                f" start a program with a variable over {MAX_ENV_ENTRY} bytes",
                hint=f"unset {name} or pass the data in a file",
            )
        kept[name] = value
    total = sum(len(k) + len(v) + 2 for k, v in kept.items())
    if total > MAX_ENV_TOTAL:
        raise JobError(
            f"the job's environment is {total} bytes, over the {MAX_ENV_TOTAL} bytes vmbatch"
            " passes to the guest",
            hint="unset large variables or pass the data in a file",
        )
    return kept


#: Run by ``start`` just before it execs the job, in a subshell (its IFS and ``set -f`` do
#: not leak; the job's exported IFS cannot change how the line is split). If the script's
#: ``#!`` interpreter, or the program ``#!/usr/bin/env NAME`` names, is not in the guest,
#: exec would only say "start: exec: line N: .../job: not found" (status 127): say which
#: interpreter is missing in which image, and what to do, with the same status 127. The
#: line is split as Linux splits it (binfmt_script: the interpreter path, then one optional
#: argument, separated by blanks). POSIX sh only (dash, bash, busybox ash).
_INTERPRETER_CHECK = r"""(
  IFS=$(printf ' \t')
  IFS= read -r l <"$1/job" || [ -n "$l" ] || exit 0
  case $l in '#!'*) ;; *) exit 0 ;; esac
  dos=
  case $l in *"$(printf '\r')")
    dos="; its first line ends in a carriage return (DOS line ends: dos2unix converts it)" ;;
  esac
  missing() {
    m="vmbatch: cannot run the job script: its interpreter $1 is not in $vmbatch_where"
    printf '%s (first line: %s)\n' "$m" "$l" >&2
    printf '%s%s\n' "vmbatch: install it in the image, or change the script's first line" \
      " (e.g. #!/bin/sh)$dos" >&2
    exit 127
  }
  set -f
  set -- ${l#??}
  case ${1-} in /*) ;; *) exit 0 ;; esac
  [ -e "$1" ] || missing "$1"
  case $1 in */env)
    case ${2-} in
      ''|-*|*=*) ;;
      */*) [ -e "$2" ] || missing "$2 (run by $1)" ;;
      *) command -v "$2" >/dev/null 2>&1 || missing "$2 (run by $1, not on the job's PATH)" ;;
    esac ;;
  esac
  exit 0
) || exit 127"""


def start_script(
    env: Mapping[str, str],
    workdir: str | None,
    args: tuple[str, ...] = (),
    image: str = "",
    *,
    tools: bool = False,
) -> str:
    """The generated ``start``: every value quoted, so no content can become a command.

    ``image`` (the job's image name) is named if the script's interpreter is missing.
    ``tools``: the job directory's ``bin`` (vmbatch's ``srun``) comes first on PATH.
    """
    lines = ["# generated by vmbatch: the job's environment and working directory"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    if tools:
        lines.append('export PATH="$1/bin:${PATH:-/usr/local/bin:/usr/bin:/bin}"')
    if workdir is not None:
        q = shlex.quote(workdir)
        lines.append(
            f"cd -- {q} || {{ printf 'vmbatch: the working directory %s does not exist in"
            f" the guest\\n' {q} >&2; exit 1; }}"
        )
    where = f"image '{image}'" if image else "the guest's image"
    lines += [f"vmbatch_where={shlex.quote(where)}", _INTERPRETER_CHECK]
    lines.append(" ".join(['exec "$1/job"', *map(shlex.quote, args)]))
    return "\n".join(lines) + "\n"


#: Ends each file in :func:`install_script`; "-" is not in the base64 alphabet, so no
#: encoded line can equal it.
_EOF = "VMBATCH-END-OF-FILE"


def install_script(
    dir_: str,
    files: Mapping[str, bytes],
    walltime: int,
    grace: float,
    *,
    start: bool = True,
    fifo: bool = False,
) -> bytes:
    """A sh script (sent on stdin) that writes ``files`` into ``dir_`` and starts the job
    (``start=False``: only writes them). ``fifo``: ``stdin`` is made a named pipe that the
    host streams the job's stdin into (:meth:`Session.start`).

    Contents travel base64-encoded in quoted here-documents (``base64 -d``: coreutils and
    busybox), so no byte of them is ever read as shell syntax; one exec channel instead of
    one per file (each costs the guest a login shell and a PAM session).
    """
    d = shlex.quote(dir_)
    lines = ["set -e", "umask 077", f"mkdir -p {d}", f"chmod 0700 {d}"]
    for name, content in files.items():
        if "/" in name:  # bin/srun: a tool for the job, on its PATH
            lines.append(f"mkdir -p {d}/{shlex.quote(name.rsplit('/', 1)[0])}")
        encoded = base64.encodebytes(content).decode("ascii")
        lines += [f"base64 -d > {d}/{shlex.quote(name)} <<'{_EOF}'", encoded + _EOF]
        if name.startswith("bin/"):
            lines.append(f"chmod 0700 {d}/{shlex.quote(name)}")
    if fifo:
        lines.append(f"[ -p {d}/stdin ] || mkfifo {d}/stdin")
    lines.append(f"chmod 0700 {d}/job")
    if start:
        lines.append(f"exec sh {d}/supervisor.sh {d} {int(walltime)} {int(grace)}")
    return ("\n".join(lines) + "\n").encode("ascii")


def _sh(command: str) -> str:
    """Run ``command`` with /bin/sh whatever the user's login shell is (csh, fish, ...)."""
    return "exec /bin/sh -c " + shlex.quote(command)


@contextlib.contextmanager
def _closed_after(
    transport: paramiko.Transport, seconds: float | None
) -> Iterator[threading.Event]:
    """Close ``transport`` if the block is still running after ``seconds`` (None: never).

    paramiko's ``exec_command`` and ``recv_exit_status`` wait without a timeout, and a
    channel's read timeout does not cover them; closing the transport wakes every wait on
    it. The yielded event tells whether that happened.
    """
    expired = threading.Event()
    if seconds is None:
        yield expired
        return

    def expire() -> None:
        expired.set()
        transport.close()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


def guest_dir(job_id: str, step: str | None = None) -> str:
    """The job's directory in the guest; each step of the job has its own."""
    name = job_id if step is None else f"{job_id}.{step}"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
    return f"/var/tmp/vmbatch-{safe}"  # noqa: S108 - in the guest: fresh VM, only the job's user


def _winsize(fd: int) -> tuple[int, int]:
    """(columns, rows) of the terminal on ``fd``; 80x24 if it does not say."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return (cols or 80, rows or 24)


def _stdin_kind(fd: int | None) -> str:
    """How a descriptor becomes the job's stdin: ``empty`` (none, /dev/null, unreadable),
    ``file`` (uploaded), ``stream`` (a pipe or socket, copied while the job runs) or
    ``terminal`` (:meth:`Session.attach`)."""
    if fd is None:
        return "empty"
    try:
        st = os.fstat(fd)
    except OSError:
        return "empty"
    if os.isatty(fd):
        return "terminal"
    if stat.S_ISREG(st.st_mode):
        return "file" if st.st_size > 0 else "empty"
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        return "stream"
    return "empty"  # /dev/null and other devices


class Session:
    """One job in one guest. ``connect`` returns a fresh logged-in client."""

    def __init__(
        self,
        connect: Callable[[], paramiko.SSHClient],
        is_alive: Callable[[], bool],
        job: GuestJob,
        *,
        reconnect_timeout: float = 600.0,
        liveness_interval: float = 30.0,
        liveness_timeout: float = 10.0,
        exec_timeout: float | None = None,
        client: paramiko.SSHClient | None = None,
        watch: Callable[[], None] | None = None,
        watch_interval: float = 1.0,
        stdin: int | None = None,
        paused: Callable[[], tuple[bool, int]] | None = None,
        on_signal: Callable[[int], bool] | None = None,
    ) -> None:
        """``stdin``: a descriptor whose data becomes the job's stdin (a regular file is
        uploaded before the job starts, a pipe or socket is streamed while it runs, a
        terminal is for :meth:`attach`); None: the job's stdin is empty. ``paused``: whether
        root holds the VM paused now, and how many pauses there were (root's pause note,
        :mod:`vmbatch.pausing`); no paused time counts against a timeout. ``on_signal``: called
        with each signal the job's starter gets while the job runs; True: it took the
        signal, which is forwarded only when it calls :meth:`forward_later` (SIGUSR2: after
        a checkpoint, ``[checkpoint].usr2``)."""
        self._connect = connect
        self._paused = paused or (lambda: (False, 0))
        self._on_signal = on_signal
        self._later: list[int] = []
        self._later_lock = threading.Lock()
        self._is_alive = is_alive
        self.job = job
        self.dir = guest_dir(job.job_id, job.step)
        self.reconnect_timeout = reconnect_timeout
        self.liveness_interval = liveness_interval
        self.liveness_timeout = liveness_timeout
        #: Seconds one short command (upload and start, a signal) may take before its
        #: connection is closed and counted as dropped; None: no limit.
        self.exec_timeout = exec_timeout
        self.client = client
        self.out_bytes = 0
        self.err_bytes = 0
        self.reconnects = 0
        #: How often the guest has answered (output, a liveness check, a command's status);
        #: a drop after it grew starts a new ``reconnect_timeout`` (see the module docstring).
        self.heard = 0
        self._kill_at: float | None = None
        #: Called every ``watch_interval`` s while the job runs (e.g. the disk budget);
        #: a JobError from it kills the job in the guest and ends :meth:`follow` with it.
        self.watch = watch
        self.watch_interval = watch_interval
        self._watch_at = 0.0
        self.stdin = stdin
        self._stdin_kind = _stdin_kind(stdin)
        self._feeder: threading.Thread | None = None
        self._fed = threading.Event()
        self._stdin_ended = False

    # -- connection -------------------------------------------------------------------
    def _transport(self) -> paramiko.Transport:
        if self.client is None:
            self.client = self._connect()
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestConnectionError("the SSH connection to the guest is closed")
        return transport

    def _reconnect(self) -> None:
        """Drop the old client and log in again, once: one attempt of the caller's policy.

        Raises GuestLostError if the domain no longer runs, GuestConnectionError if the
        login fails or hands back a connection that is not open (a ``connect`` may return a
        client whose transport has already closed; taking that as success made every retry
        loop on top of it spin without ever waiting).
        """
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        if not self._is_alive():
            raise GuestLostError(
                "the VM stopped while the job was running (the guest crashed, or"
                " shut itself down); the job's output so far was delivered",
                hint="see the VM's console log; the job did not finish",
            )
        client = self._connect()
        transport = client.get_transport()
        if transport is None or not transport.is_active():
            with contextlib.suppress(Exception):
                client.close()
            raise GuestConnectionError("the new SSH connection to the guest closed at once")
        self.client = client
        self.reconnects += 1
        log.warning("reconnected to the guest (%d so far)", self.reconnects)

    def _exec(self, command: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        """Run a short command; return (status, stdout, stderr).

        With ``exec_timeout``, a command that has not finished by then (a hung guest) closes
        the connection and counts as a drop.
        """
        transport = self._transport()
        with _closed_after(transport, self.exec_timeout) as expired:
            try:
                result = self._exec_on(transport, command, stdin)
            except _DROPS as exc:
                if expired.is_set():
                    raise GuestConnectionError(
                        f"the guest did not finish a command within {self.exec_timeout:g}s"
                    ) from exc
                raise
        self.heard += 1
        return result

    def _exec_on(
        self, transport: paramiko.Transport, command: str, stdin: bytes
    ) -> tuple[int, bytes, bytes]:
        chan = transport.open_session(timeout=self.exec_timeout)
        try:
            chan.exec_command(_sh(command))
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out = chan.makefile("rb").read()
            err = chan.makefile_stderr("rb").read()
            status = chan.recv_exit_status()
            if status < 0:
                raise GuestConnectionError("the SSH connection to the guest dropped")
            return status, out, err
        finally:
            chan.close()

    def _until_done(self, what: str, step: Callable[[], _T]) -> _T:
        """Run ``step``; after a dropped connection, log in again and run it again.

        Each login plus ``step`` is one attempt of SSH_RECONNECT_POLICY (waits, back-off, and
        ``reconnect_timeout``); a step that drops after the guest answered starts afresh.
        No attempt is made while root holds the VM paused, and a window in which the VM
        was paused, or this process was stopped (a scheduler's suspend), starts again when
        it runs out: a suspension of any length is never taken for a lost guest.
        """
        try:
            return step()
        except _DROPS as exc:
            drop: BaseException = exc
        while True:
            log.warning("lost the guest while %s (%s); reconnecting", what, drop)
            heard = self.heard
            epoch = self._epoch()
            try:
                for attempt in SSH_RECONNECT_POLICY.retrying(max_delay=self.reconnect_timeout):
                    with attempt:
                        self._wait_while_paused()
                        self._reconnect()
                        try:
                            return step()
                        except _DROPS as exc:
                            if self.heard == heard:  # nothing since the login: failed attempt
                                raise GuestConnectionError(
                                    f"the connection dropped again while {what}: {exc}"
                                ) from exc
                            drop = exc
                            break  # the guest answered in between: a new drop, a new window
            except GuestConnectionError as exc:
                if self._epoch() != epoch:
                    drop = exc
                    log.warning("the job was suspended meanwhile; the reconnect window restarts")
                    continue
                raise GuestLostError(
                    f"the VM stopped answering while the job was running (no working SSH"
                    f" connection for {self.reconnect_timeout:.0f}s; last error: {exc})",
                    hint="see the VM's console log; the guest may have hung or run out of memory",
                ) from exc

    def _epoch(self) -> tuple[int, int]:
        """Changes whenever the VM was paused by root or this process was continued."""
        return self._paused()[1], signals.continued()

    def _wait_while_paused(self) -> None:
        """Wait, for as long as it takes, while root holds the VM paused (an operator's or
        the scheduler's suspend, a checkpoint): it cannot answer, and that is no fault."""
        if not self._paused()[0]:
            return
        log.warning("the job's VM is paused; waiting for it to run again")
        while self._paused()[0]:
            time.sleep(0.5)  # polling root's pause note; the pause may last days
        log.warning("the job's VM runs again")

    def _robust_exec(self, command: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        return self._until_done("running a command", lambda: self._exec(command, stdin))

    # -- the job ----------------------------------------------------------------------
    def start(self) -> None:
        """Upload the files and start the job (detached), in one round trip (a regular
        file as stdin is uploaded first; a pipe is streamed from then on)."""
        if self._stdin_kind == "file":
            self._until_done("sending the job's stdin", self._upload_stdin)
        files = self._files()
        if self._stdin_kind in ("file", "stream"):  # uploaded already; a named pipe
            del files["stdin"]
        status, _, err = self._robust_exec(
            "exec /bin/sh -s",
            install_script(
                self.dir, files, self.job.walltime, self.job.kill_grace,
                fifo=self._stdin_kind == "stream",
            ),
        )  # fmt: skip
        if status != 0:
            raise GuestConnectionError(
                f"could not upload and start the job in the guest (status {status}):"
                f" {err.decode(errors='replace').strip()[-300:]}"
            )
        if self._stdin_kind == "stream":
            self._feeder = threading.Thread(target=self._feed_stdin, daemon=True)
            self._feeder.start()

    def has_started(self) -> bool:
        """Whether the guest's job directory already holds this job, started (the
        supervisor's ``started`` and ``pid``): a VM restored from a checkpoint runs it on.
        Then :meth:`follow` copies its output from the first byte (a requeued job's output
        file is written anew by the scheduler) and nothing is uploaded; a stdin stream
        cannot be fed again, so its end is marked."""
        d = shlex.quote(self.dir)
        _, out, _ = self._robust_exec(f"[ -d {d}/started ] && [ -e {d}/pid ] && echo started; true")
        if out.strip() != b"started":
            return False
        log.warning("the job runs in its restored VM already: following it from its start")
        if self._stdin_kind == "stream":
            self._fed.set()
        return True

    @property
    def interactive(self) -> bool:
        """The job's stdin is a terminal: run it with :meth:`attach`."""
        return self._stdin_kind == "terminal"

    def _stdin_fd(self) -> int:
        if self.stdin is None:
            raise ValueError("the session was given no stdin")
        return self.stdin

    def _files(self) -> dict[str, bytes]:
        here = importlib.resources.files("vmbatch.guest")
        start = start_script(
            self.job.environment, self.job.workdir, self.job.args, self.job.image,
            tools=self.job.srun,
        )  # fmt: skip
        files = {
            "supervisor.sh": here.joinpath("supervisor.sh").read_bytes(),
            "start": start.encode(),
            "job": self.job.script,
            "stdin": b"",
        }
        if self.job.srun:
            files["bin/srun"] = here.joinpath("srun.sh").read_bytes()
        return files

    def _upload_stdin(self) -> None:
        """Copy the regular file on ``stdin`` to the guest's ``stdin``, byte for byte (sent
        again whole after a drop; the guest's byte count must match)."""
        fd = self._stdin_fd()
        d = shlex.quote(self.dir)
        size = os.fstat(fd).st_size
        transport = self._transport()
        chan = transport.open_session(timeout=self.exec_timeout)
        try:
            chan.exec_command(
                _sh(
                    f"umask 077; mkdir -p {d} && chmod 0700 {d} && cat > {d}/stdin.part"
                    f' && [ "$(wc -c < {d}/stdin.part)" -eq {size} ]'
                    f" && mv {d}/stdin.part {d}/stdin"
                )
            )
            offset = 0
            while offset < size:
                chunk = os.pread(fd, min(1 << 20, size - offset), offset)
                if not chunk:
                    break
                chan.sendall(chunk)
                offset += len(chunk)
            chan.shutdown_write()
            status = chan.recv_exit_status()
        finally:
            chan.close()
        if status < 0:
            raise GuestConnectionError("the SSH connection to the guest dropped")
        if status != 0:
            raise GuestConnectionError(
                f"could not copy the job's stdin ({size} bytes) into the guest (status {status})"
            )
        self.heard += 1

    def _feed_stdin(self) -> None:
        """Stream the host's stdin (a pipe) into the guest's ``stdin`` FIFO (a second
        thread, on the connection the job was started on; it never logs in itself). A
        dropped connection ends the job's stdin early (said on the job's stderr); the end
        of input is then marked by :meth:`follow` once it has reconnected."""
        fd = self._stdin_fd()
        d = shlex.quote(self.dir)
        try:
            client = self.client
            transport = client.get_transport() if client is not None else None
            if transport is None or not transport.is_active():
                raise GuestConnectionError("the SSH connection to the guest is closed")
            chan = transport.open_session()
            try:
                # Once the job has ended its stdin is no longer a named pipe (the supervisor
                # removes it), so this never waits for a reader that will not come.
                chan.exec_command(_sh(f"[ -p {d}/stdin ] || exit 0; exec cat > {d}/stdin"))
                while data := os.read(fd, 65536):
                    if chan.exit_status_ready():  # the job no longer reads its stdin
                        break
                    chan.sendall(data)
                chan.shutdown_write()
                if chan.recv_exit_status() < 0:
                    raise GuestConnectionError("the SSH connection to the guest dropped")
            finally:
                chan.close()
            self._fed.set()
            self._mark_end_of_stdin(transport)
        except (*_DROPS, ValueError) as exc:
            if not self._fed.is_set():
                log.warning("the job's stdin was cut short: %s", exc)
            self._fed.set()

    def _mark_end_of_stdin(self, transport: paramiko.Transport) -> None:
        """``stdin.eof``: the supervisor stops holding the pipe open, the job sees end of
        file. Idempotent; raises on a dropped connection."""
        self._exec_on(transport, f": > {shlex.quote(self.dir)}/stdin.eof", b"")
        self._stdin_ended = True

    def _end_stdin_if_due(self) -> None:
        """After a reconnect: the feeder finished (or lost its connection) but the end of
        input may not have reached the guest; mark it on the current connection."""
        if self._fed.is_set() and not self._stdin_ended:
            self._mark_end_of_stdin(self._transport())

    def follow(self, out: BinaryIO, err: BinaryIO) -> int:
        """Copy the job's output until it ends; return its status. Signals are forwarded."""
        with signals.forwarded(FORWARDED) as pending:
            self._until_done("following the job", lambda: self._follow_once(out, err, pending))
            return self._until_done("collecting the job's output", lambda: self._drain(out, err))

    def _follow_command(self) -> str:
        d = shlex.quote(self.dir)
        return (
            f'D={d}; tail -c +{self.out_bytes + 1} -f "$D/stdout" & a=$!;'
            f' tail -c +{self.err_bytes + 1} -f "$D/stderr" >&2 & b=$!;'
            ' while [ ! -e "$D/status" ]; do sleep 0.2 2>/dev/null || sleep 1; done;'
            " kill $a $b; wait; exit 0"
        )

    def _follow_once(self, out: BinaryIO, err: BinaryIO, pending: signals.Pending) -> None:
        """One follow channel, until the job's status file exists."""
        self._end_stdin_if_due()
        transport = self._transport()
        chan = transport.open_session()
        heard = time.monotonic()
        try:
            chan.exec_command(_sh(self._follow_command()))
            while True:
                self._handle_signals(pending)
                self._watch()
                moved = self._pump(chan, out, err)
                if moved:
                    heard = time.monotonic()
                    continue
                if self.liveness_interval > 0 and time.monotonic() - heard > self.liveness_interval:
                    if not self._paused()[0]:  # a paused VM is silent, not lost
                        self._probe(transport)
                    heard = time.monotonic()
                if chan.exit_status_ready() and not (chan.recv_ready() or chan.recv_stderr_ready()):
                    status = chan.recv_exit_status()
                    if status < 0 or not transport.is_active():  # closed without a status
                        raise GuestConnectionError("the SSH connection to the guest dropped")
                    if status != 0:
                        raise GuestLostError(
                            f"following the job's output in the guest failed (status {status});"
                            f" its files in {self.dir} are gone or unreadable"
                        )
                    return
                if not transport.is_active() or chan.closed:
                    raise GuestConnectionError("the SSH connection to the guest dropped")
                select.select([chan], [], [], 0.2)
        finally:
            chan.close()

    def _watch(self) -> None:
        if self.watch is None or time.monotonic() < self._watch_at:
            return
        self._watch_at = time.monotonic() + self.watch_interval
        try:
            self.watch()
        except JobError as exc:
            log.warning("ending the job: %s", exc)
            with contextlib.suppress(*_DROPS, GuestLostError):
                self.send_signal(signal.SIGKILL)
            raise

    def _probe(self, transport: paramiko.Transport) -> None:
        """Run ``true`` in the guest within ``liveness_timeout``, or count it as a drop.

        A hung guest keeps its forwarded port open (QEMU's user network answers for it), so
        a silent job and a silent guest look alike until the guest is asked something.
        """
        deadline = time.monotonic() + self.liveness_timeout
        try:
            chan = transport.open_session(timeout=self.liveness_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise GuestConnectionError(f"the guest did not open a channel: {exc}") from exc
        try:
            chan.exec_command("true")
            while not chan.exit_status_ready():
                if time.monotonic() > deadline or chan.closed:
                    raise GuestConnectionError(
                        f"the guest did not answer within {self.liveness_timeout:.0f}s"
                    )
                select.select([chan], [], [], 0.2)
            self.heard += 1
        finally:
            chan.close()

    def _pump(self, chan: paramiko.Channel, out: BinaryIO, err: BinaryIO) -> bool:
        moved = False
        if chan.recv_ready():
            data = chan.recv(65536)
            out.write(data)
            out.flush()
            self.out_bytes += len(data)
            moved = bool(data)
        if chan.recv_stderr_ready():
            data = chan.recv_stderr(65536)
            err.write(data)
            err.flush()
            self.err_bytes += len(data)
            moved = moved or bool(data)
        if moved:
            self.heard += 1
        return moved

    def _drain(self, out: BinaryIO, err: BinaryIO) -> int:
        d = shlex.quote(self.dir)
        chan = self._transport().open_session()
        try:
            chan.exec_command(
                _sh(
                    f'D={d}; tail -c +{self.out_bytes + 1} "$D/stdout";'
                    f' tail -c +{self.err_bytes + 1} "$D/stderr" >&2;'
                    ' read -r st <"$D/status"; exit "$st"'
                )
            )
            while not (chan.exit_status_ready() and not chan.recv_ready()
                       and not chan.recv_stderr_ready()):  # fmt: skip
                if not self._pump(chan, out, err):
                    if chan.closed and not chan.exit_status_ready():
                        raise GuestConnectionError("the SSH connection to the guest dropped")
                    select.select([chan], [], [], 0.2)
            status = chan.recv_exit_status()
            if status < 0:
                raise GuestConnectionError("the SSH connection to the guest dropped")
            return status
        finally:
            chan.close()

    def _handle_signals(self, pending: signals.Pending) -> None:
        for signum in pending.take():
            if self._on_signal is None or not self._on_signal(signum):
                self._forward(signum)
        with self._later_lock:
            later, self._later = self._later, []
        for signum in later:
            self._forward(signum)
        self._kill_if_due()

    def forward_later(self, signum: int) -> None:
        """Forward ``signum`` to the job at the follow loop's next turn (any thread)."""
        with self._later_lock:
            self._later.append(signum)

    def _forward(self, signum: int) -> None:
        self.send_signal(signum)
        if signum in TERMINATING and self._kill_at is None:
            self._kill_at = time.monotonic() + self.job.kill_grace

    def _kill_if_due(self) -> None:
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            self._kill_at = float("inf")  # once
            log.warning("the job did not end %.0fs after the signal: SIGKILL", self.job.kill_grace)
            self.send_signal(signal.SIGKILL)

    # -- an interactive job (a terminal) ----------------------------------------------
    def attach(self, out: BinaryIO, on_start: Callable[[], None] | None = None) -> int:
        """Run the job on a pseudo-terminal in the guest, attached to the terminal on
        ``stdin`` (``srun --pty``), as ``ssh -t`` does; return its status. ``on_start`` is
        called once the guest runs it.

        The local terminal is put in raw mode, so every key (Ctrl-C, Ctrl-D, Ctrl-Z) goes to
        the guest's terminal, whose line discipline turns it into the signal or end of file
        the foreground program expects; the terminal's size is sent at start and after
        every SIGWINCH (``resize_pty``). Signals sent to this process (``scancel``) go to
        the job as for a detached job. An interactive job lives as long as its connection:
        if the connection drops, the guest's sshd hangs the job up (SIGHUP) and this ends
        with :class:`GuestLostError`; there is nothing to follow again.
        """
        fd = self._stdin_fd()
        status, _, err = self._robust_exec(
            "exec /bin/sh -s", install_script(self.dir, self._files(), 0, 0, start=False)
        )
        if status != 0:
            raise GuestConnectionError(
                f"could not upload the job to the guest (status {status}):"
                f" {err.decode(errors='replace').strip()[-300:]}"
            )
        transport = self._transport()
        chan = transport.open_session()
        d = shlex.quote(self.dir)
        cols, rows = _winsize(fd)
        chan.get_pty(term=self.job.environment.get("TERM") or "vt100", width=cols, height=rows)
        # The session leader of the guest's terminal (its pid is the job's process group)
        # runs the job as its child and outlives it (a no-op trap, which children do not
        # inherit), to exit with the job's status: sshd reports a session whose process
        # died of a signal as "exit-signal", which paramiko does not pass on.
        chan.exec_command(
            _sh(
                f"echo $$ > {d}/pid; trap : INT TERM HUP QUIT; sh {d}/start {d}; st=$?;"
                f' echo "$st" > {d}/status; exit "$st"'
            )
        )
        if on_start is not None:
            on_start()
        saved = termios.tcgetattr(fd)
        try:
            tty.setraw(fd, termios.TCSANOW)
            with signals.forwarded((*FORWARDED, signal.SIGWINCH)) as pending:
                self._interact(fd, chan, transport, out, pending)
            code = chan.recv_exit_status() if chan.exit_status_ready() else -1
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            chan.close()
        if code < 0 and self._kill_at is not None:
            code = 128 + signal.SIGKILL  # our own SIGKILL after kill_grace took the session
        if code < 0:
            raise GuestLostError(
                "the connection to the job's VM dropped; an interactive job ends with its"
                " connection",
                hint="see the VM's console log if the VM stopped",
            )
        return code

    def _interact(
        self,
        fd: int,
        chan: paramiko.Channel,
        transport: paramiko.Transport,
        out: BinaryIO,
        pending: signals.Pending,
    ) -> None:
        reading = True
        while True:
            for signum in pending.take():
                if signum == signal.SIGWINCH:
                    chan.resize_pty(*_winsize(fd))
                else:
                    self._forward(signum)
            self._kill_if_due()
            watched: list[Any] = [chan, fd] if reading else [chan]
            ready, _, _ = select.select(watched, [], [], 0.2)
            if chan.recv_ready():
                data = chan.recv(65536)
                out.write(data)
                out.flush()
            if reading and fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's other side went away
                    data = b""
                if data:
                    chan.sendall(data)
                else:
                    reading = False
                    chan.shutdown_write()
            if chan.recv_ready():
                continue  # everything the guest sent is shown before the loop ends
            if chan.exit_status_ready() or chan.closed or not transport.is_active():
                return

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the job's process group in the guest."""
        name = signal.Signals(signum).name.removeprefix("SIG")
        d = shlex.quote(self.dir)
        log.info("forwarding SIG%s to the job", name)
        status, _, err = self._robust_exec(
            f'read -r p <{d}/pid && kill -s {name} -- "-$p" 2>/dev/null; true'
        )
        if status != 0:
            log.warning("could not signal the job: %s", err.decode(errors="replace").strip())
