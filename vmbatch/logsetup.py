"""Where vmbatch's log lines go (``[log]``): the journal, syslog or stderr; each line names
its job, and no secret gets through.

Every entry point calls :func:`early` first (stderr only: the configuration may be broken)
and :func:`configure` once the configuration is read. The job id comes from
:func:`set_job` (the hooks: one job per process, threads included) or the :func:`job`
context (a command that handles several jobs, such as the reaper): a filter puts it on
every record, so no call site spells it out.

Outside contracts:

- journald's native protocol (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/): one
  ``AF_UNIX``/``SOCK_DGRAM`` datagram per entry to ``/run/systemd/journal/socket``, one
  ``KEY=VALUE\\n`` per field; a value holding a newline is sent as ``KEY\\n``, its length
  as a 64-bit little-endian integer, the bytes and ``\\n``; an entry too large for one
  datagram goes in a sealed memfd passed with ``SCM_RIGHTS``. Fields
  (systemd.journal-fields(7)): ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER``,
  ``SYSLOG_FACILITY``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``, and vmbatch's own
  ``VMBATCH_JOB_ID`` (``journalctl VMBATCH_JOB_ID=42``), ``VMBATCH_STAGE`` and
  ``VMBATCH_SECONDS`` on stage lines.
- syslog: the local form glibc's syslog(3) writes to ``/dev/log`` (RFC 3164, section 4.1:
  ``<PRI>Mmm dd hh:mm:ss TAG[PID]: MSG``), which rsyslog, syslog-ng and journald's own
  ``/dev/log`` socket all parse; ``[job 42]`` starts the text.

A socket that is missing, refuses or stays full for :data:`SEND_TIMEOUT` seconds is given
up for the rest of the process, with one warning: journald falls back to syslog, syslog to
stderr. Logging never fails or hangs a hook.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import logging
import os
import re
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vmbatch.state import JobDir

if TYPE_CHECKING:
    from vmbatch.config import LogConfig

log = logging.getLogger(__name__)

#: Seconds one datagram may wait for room in the receiver's queue (a stuck journald or
#: syslog daemon, or a test's socket nobody reads) before the target is given up.
SEND_TIMEOUT = 2.0
#: rsyslog's default ``$MaxMessageSize`` is 8 KiB: longer syslog lines are cut there.
SYSLOG_MAX = 8192
#: Lines of a job kept in memory until its directory exists (then written, in order).
PENDING_MAX = 500

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: syslog(3) facility codes (RFC 5424, table 1).
FACILITIES = {
    "user": 1,
    "daemon": 3,
    **{f"local{n}": 16 + n for n in range(8)},
}


def _severity(levelno: int) -> int:
    """syslog severity (RFC 5424 table 2) of a logging level."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


# -- the job of a line ------------------------------------------------------------------

_JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("vmbatch_job", default=None)
#: The process's own job (a hook handles one): also its threads' lines (a new thread does
#: not see the context variables of the thread that started it).
_process_job: str | None = None


def set_job(job_id: str | None) -> None:
    """The job this process works for; every line from now on names it."""
    global _process_job
    _process_job = job_id[:100] if job_id else None


@contextlib.contextmanager
def job(job_id: str) -> Iterator[None]:
    """Lines logged in this block (this thread) name ``job_id``."""
    token = _JOB.set(job_id[:100])
    try:
        yield
    finally:
        _JOB.reset(token)


def current_job() -> str | None:
    return _JOB.get() or _process_job


class JobFilter(logging.Filter):
    """Puts ``job_id`` on every record (an ``extra={"job_id": ...}`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "job_id", None):
            record.job_id = current_job()
        return True


def stage(logger: logging.Logger, name: str, seconds: float, note: str = "") -> None:
    """The one INFO line a stage gets: ``stage NAME took 1.234s[ (note)]``."""
    logger.info(
        "stage %s took %.3fs%s",
        name,
        seconds,
        f" ({note})" if note else "",
        extra={"stage": name, "seconds": round(seconds, 3)},
    )


# -- secrets ----------------------------------------------------------------------------

#: PEM and OpenSSH private keys, also cut off or with escaped newlines (``repr``).
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.S
)
_secrets: set[str] = set()
#: Shorter pieces are not masked (they would mask ordinary words).
_MIN_SECRET = 12


def secret(value: str) -> None:
    """Never log ``value`` (a private key, a token), nor any of its lines."""
    for piece in (value, *value.splitlines()):
        piece = piece.strip()
        if len(piece) >= _MIN_SECRET:
            _secrets.add(piece)


def redact(text: str) -> str:
    """``text`` with private key blocks and registered secrets masked."""
    text = _PRIVATE_KEY.sub("[private key redacted]", text)
    for value in sorted(_secrets, key=len, reverse=True):
        if value in text:
            text = text.replace(value, "[redacted]")
    return text


# -- formats ----------------------------------------------------------------------------

_WORD = {
    logging.DEBUG: "debug: ",
    logging.WARNING: "warning: ",
    logging.ERROR: "error: ",
    logging.CRITICAL: "critical: ",
}


class BodyFormatter(logging.Formatter):
    """The text of a line for the journal, syslog and ``vmbatch.log``:
    ``[job 42] warning: the message`` (no level word for INFO, as OpenSSH logs)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        prefix = f"[job {job_id}] " if job_id else ""
        return redact(prefix + _WORD.get(record.levelno, "") + text)


class StderrFormatter(logging.Formatter):
    """``IDENT[JOB]: LEVEL: message`` (``IDENT: LEVEL: message`` without a job)."""

    def __init__(self, ident: str) -> None:
        super().__init__("%(levelname)s: %(message)s")
        self.ident = ident

    def format(self, record: logging.LogRecord) -> str:
        job_id = getattr(record, "job_id", None)
        who = f"{self.ident}[{str(job_id)[:40]}]" if job_id else self.ident
        return redact(f"{who}: {super().format(record)}")


class FileFormatter(BodyFormatter):
    """``2026-11-30T10:30:21.123+00:00 IDENT[PID]: [job 42] message`` (``vmbatch.log``)."""

    def __init__(self, ident: str) -> None:
        super().__init__()
        self.ident = ident

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        millis = int(record.msecs)
        body = super().format(record)
        return f"{stamp}.{millis:03d}+00:00 {self.ident}[{record.process}]: {body}"


# -- handlers ---------------------------------------------------------------------------


class _DatagramHandler(logging.Handler):
    """Sends each record as one datagram to a unix socket; on the first failure (no
    socket, refused, full for :data:`SEND_TIMEOUT`) gives the socket up and hands this and
    every later record to ``fallback``, after one warning there."""

    kind = "?"

    def __init__(self, path: Path, ident: str, facility: int, fallback: logging.Handler) -> None:
        super().__init__()
        self.path = path
        self.ident = ident
        self.facility = facility
        self.fallback = fallback
        self.sock: socket.socket | None = None
        self.failed = False
        self.setFormatter(BodyFormatter())

    def payload(self, record: logging.LogRecord) -> bytes:
        raise NotImplementedError

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            self.fallback.handle(record)
            return
        try:
            data = self.payload(record)
        except Exception:  # noqa: BLE001 - a bad format string is reported, never raised
            self.handleError(record)
            return
        try:
            self.send(data)
        except OSError as exc:
            self.give_up(exc)
            self.fallback.handle(record)

    def connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(SEND_TIMEOUT)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                raise
            self.sock = sock
        return self.sock

    def send(self, data: bytes) -> None:
        try:
            self.connect().send(data)
        except (ConnectionRefusedError, FileNotFoundError):
            # The daemon was restarted since: its new socket, once.
            self.close_socket()
            self.connect().send(data)

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def give_up(self, exc: OSError) -> None:
        self.failed = True
        self.close_socket()
        why = exc.strerror or str(exc) or type(exc).__name__  # TimeoutError: "timed out"
        warning = logging.LogRecord(
            "vmbatch.logsetup", logging.WARNING, __file__, 0,
            "cannot log to %s at %s (%s); logging to %s instead",
            (self.kind, self.path, why, _name(self.fallback)), None,
        )  # fmt: skip
        self.fallback.handle(warning)

    def close(self) -> None:
        self.close_socket()
        super().close()


def _name(handler: logging.Handler) -> str:
    if isinstance(handler, _DatagramHandler):
        return f"{handler.kind} at {handler.path}"
    return "stderr"


class SyslogHandler(_DatagramHandler):
    """``<PRI>Mmm dd hh:mm:ss TAG[PID]: [job 42] message`` to a syslog socket."""

    kind = "syslog"

    def payload(self, record: logging.LogRecord) -> bytes:
        pri = self.facility * 8 + _severity(record.levelno)
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(record.created))
        # One line: a daemon would cut the rest or log it as lines of their own.
        body = self.format(record).replace("\n", " | ")
        line = f"<{pri}>{stamp} {self.ident}[{record.process}]: {body}"
        data = line.encode(errors="replace")
        cut = b" [truncated]"
        return data if len(data) <= SYSLOG_MAX else data[: SYSLOG_MAX - len(cut)] + cut


def journal_fields(fields: dict[str, str]) -> bytes:
    """Serialise an entry in the native protocol (see the module docstring)."""
    out = bytearray()
    for key, value in fields.items():
        raw = value.encode(errors="replace")
        if b"\n" in raw:
            out += key.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += key.encode() + b"=" + raw + b"\n"
    return bytes(out)


class JournalHandler(_DatagramHandler):
    """Native journal entries (see the module docstring)."""

    kind = "journald"

    def payload(self, record: logging.LogRecord) -> bytes:
        fields = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(_severity(record.levelno)),
            "SYSLOG_IDENTIFIER": self.ident,
            "SYSLOG_FACILITY": str(self.facility),
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "VMBATCH_LOGGER": record.name,
        }
        job_id = getattr(record, "job_id", None)
        if job_id:
            fields["VMBATCH_JOB_ID"] = str(job_id)
        if (name := getattr(record, "stage", None)) is not None:
            fields["VMBATCH_STAGE"] = str(name)
            fields["VMBATCH_SECONDS"] = str(getattr(record, "seconds", ""))
        return journal_fields(fields)

    def send(self, data: bytes) -> None:
        try:
            super().send(data)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self.send_memfd(data)

    def send_memfd(self, data: bytes) -> None:
        """An entry too large for one datagram: in a sealed memfd, passed as its only
        content (the protocol's second form)."""
        fd = os.memfd_create("vmbatch-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self.connect().sendmsg([], rights)
        finally:
            os.close(fd)


class JobFileHandler(logging.Handler):
    """Root's lines of a job, also into ``<[paths].job_dir>/<job>/vmbatch.log`` while that
    directory exists (``vmbatch logs`` shows them): appended, created 0600, never through a
    symbolic link, never into a file root does not own. Lines of a job whose directory does
    not exist yet are kept (at most :data:`PENDING_MAX`) and written first once it does.
    Only the main thread's lines: another thread's write could land while teardown removes
    the directory and leave it behind."""

    def __init__(self, job_dir: Path, ident: str) -> None:
        super().__init__()
        self.job_dir = job_dir
        self.pending: dict[str, list[str]] = {}
        self.setFormatter(FileFormatter(ident))

    def emit(self, record: logging.LogRecord) -> None:
        job_id = getattr(record, "job_id", None)
        if not job_id or threading.current_thread() is not threading.main_thread():
            return
        try:
            line = self.format(record).replace("\n", "\n    ") + "\n"
        except Exception:  # noqa: BLE001 - a bad format string is reported, never raised
            self.handleError(record)
            return
        jobdir = JobDir(self.job_dir, str(job_id))
        if not jobdir.path.is_dir():
            kept = self.pending.setdefault(str(job_id), [])
            if len(kept) < PENDING_MAX:
                kept.append(line)
            return
        lines = [*self.pending.pop(str(job_id), []), line]
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            # O_NONBLOCK: a FIFO in its place must not block the hook.
            fd = os.open(jobdir.log, flags | os.O_NONBLOCK, 0o600)
        except OSError:
            return  # the directory went meanwhile: the lines are in the system log
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.write(fd, "".join(lines).encode(errors="replace"))
        except OSError:
            pass
        finally:
            os.close(fd)


# -- set-up -----------------------------------------------------------------------------


def target_problem(cfg: LogConfig) -> str | None:
    """Why ``[log].target`` cannot be reached here (for ``vmbatch doctor``), or None."""
    if cfg.target == "stderr":
        return None
    paths = [cfg.syslog_socket] if cfg.target == "syslog" else [cfg.journal_socket]
    if cfg.target == "journald":
        paths.append(cfg.syslog_socket)
    problems: list[str] = []
    for path in paths:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
            return None if path == paths[0] else f"{'; '.join(problems)}: logging to {path}"
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
        finally:
            sock.close()
    return f"{'; '.join(problems)}: logging to stderr"


def _stderr(ident: str, level: int) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StderrFormatter(ident))
    handler.setLevel(level)
    return handler


#: The handlers :func:`_install` put on the root logger (closed when replaced; a handler
#: someone else added, such as a test runner's, is only removed).
_installed: list[logging.Handler] = []


def errors_on_stderr() -> bool:
    """Whether this process's error lines already reach stderr (``target = "stderr"``, or
    ``early`` before the configuration was read): then a hook need not write its one-line
    ``vmbatch: error: ...`` there a second time."""
    return any(
        isinstance(h, logging.StreamHandler)
        and getattr(h, "stream", None) is sys.stderr
        and h.level <= logging.ERROR
        for h in _installed
    )


def _install(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        if old in _installed:
            with contextlib.suppress(Exception):
                old.close()
    _installed[:] = handlers
    for handler in handlers:
        handler.addFilter(JobFilter())
        root.addHandler(handler)
    root.setLevel(min((h.level for h in handlers), default=logging.WARNING))
    # paramiko's INFO/DEBUG lines are about its own protocol steps, many per job.
    logging.getLogger("paramiko").setLevel(logging.WARNING)


def early(ident: str, job_id: str | None, level: int = logging.INFO) -> None:
    """Before the configuration is read: ``level`` and above to stderr."""
    set_job(job_id)
    _install([_stderr(ident, level)])


def configure(
    cfg: LogConfig,
    ident: str,
    *,
    stderr_level: int | None,
    job_dir: Path | None = None,
    level: int | None = None,
) -> None:
    """Send ``ident``'s lines to ``cfg.target`` at ``cfg.level`` (or ``level``).

    ``stderr_level``: what goes to stderr besides the target (None: nothing). With
    ``target = "stderr"`` stderr gets ``stderr_level`` and above if given (the job
    starter: the job's stderr; the CLI: its ``-v``), else the target's level. ``job_dir``:
    also write each job's lines into its ``vmbatch.log`` (root's hooks and commands).
    """
    level = LEVELS[cfg.level] if level is None else level
    facility = FACILITIES[cfg.facility]
    handlers: list[logging.Handler] = []
    if cfg.target == "stderr":
        handlers.append(_stderr(ident, level if stderr_level is None else stderr_level))
    else:
        # Once the system target is given up, root's hooks (whose stderr is the admin's:
        # the slurmd log, Torque's spool) put there what the target would have had. Where
        # stderr is the job's or a terminal (``stderr_level``), it keeps its own level.
        fallback: logging.Handler = (
            _stderr(ident, level) if stderr_level is None else logging.NullHandler()
        )
        fallback.addFilter(JobFilter())
        fallback = SyslogHandler(cfg.syslog_socket, ident, facility, fallback)
        if cfg.target == "journald":
            fallback.addFilter(JobFilter())
            fallback = JournalHandler(cfg.journal_socket, ident, facility, fallback)
        fallback.setLevel(level)
        handlers.append(fallback)
        if stderr_level is not None:
            handlers.append(_stderr(ident, stderr_level))
    if job_dir is not None:
        file_handler = JobFileHandler(job_dir, ident)
        file_handler.setLevel(level)
        handlers.append(file_handler)
    _install(handlers)
