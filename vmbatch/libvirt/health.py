"""libvirtd's health: a bounded probe, and restarts of libvirtd within a budget.

The reference for vmbatch's use case needed 78 libvirtd restarts in one run of 20,000 jobs:
libvirtd dies, stops answering, or grows until the OOM killer comes (issue 14). So:

- :func:`check` asks libvirtd for one answer on a fresh :class:`Connection` (every call
  bounded by ``[libvirt].timeout``) and says in one line, naming libvirtd, why it got none:
  dead (its PID file names a process that is gone), its socket missing, or no answer within
  the timeout (and whether its process is stopped).
- :func:`recover` restarts it with ``[libvirt].restart_command``, at most ``restart_max``
  times per ``restart_window`` seconds, then reports the node unhealthy. The count must
  survive the hook processes that make it, so each restart is recorded (time and reason) in
  ``[batch].state_dir/node/libvirtd-restarts.json`` (directory 0700, file 0600, written
  atomically) *before* the command runs, and a ``flock`` on ``libvirtd-restart.lock`` beside it
  serialises the hooks: a second prologue that finds libvirtd down waits for the first one's
  restart and then finds it healthy, instead of restarting it again. flock(2): the lock goes
  with its holder, so a SIGKILLed hook never blocks the next.
- :func:`maybe_restart_for_rss` restarts it between jobs when its resident memory
  (``VmRSS`` of proc(5) ``/proc/PID/status``, PID from ``[libvirt].pid_file``) passes
  ``[libvirt].max_rss_mib``; these restarts count against the same budget.

Restarting libvirtd leaves running VMs alone ("Restarting libvirtd does not impact running
guests", libvirtd(8), https://libvirt.org/manpages/libvirtd.html): the new libvirtd takes
the transient job VMs over again, or stops one it cannot take over (seen in some runs of
tests/system/test_libvirt_health.py: a half-booted VM, its disks already removed, stopped
by the new libvirtd with ``reason=daemon``). The connections other processes held are
lost, and vmbatch's callers reconnect (teardown retries on fresh connections, the prologue
tries once more).

The probe asks for libvirt's own version (``virConnectGetLibVersion``,
https://libvirt.org/html/libvirt-libvirt-host.html#virConnectGetLibVersion), not the
hypervisor's: that one may make libvirtd probe QEMU, which took 4-30 s on a host with
broken KVM (docs/design.md, "Broken KVM hosts").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbatch import metrics, process
from vmbatch.config import Config
from vmbatch.errors import (
    CommandError,
    HostError,
    LibvirtError,
    LibvirtTimeoutError,
    LibvirtUnavailableError,
    VmBatchError,
)
from vmbatch.libvirt.connection import Connection
from vmbatch.retry import LIBVIRTD_READY_POLICY, LIBVIRTD_RESTART_LOCK_POLICY, LockBusy
from vmbatch.state import atomic_write

log = logging.getLogger(__name__)

#: Below ``[batch].state_dir``: the restart record and its lock (not job state).
STATE_SUBDIR = "node"  # the node-wide state directory, as vmbatch.hooks.policy uses
#: libvirtd's socket for ``qemu:///system`` (libvirtd.conf ``unix_sock_dir``'s default).
SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")


@dataclass(frozen=True, slots=True)
class Restart:
    """One restart vmbatch made: when (seconds since the epoch) and why."""

    time: float
    reason: str


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :func:`recovery` achieved: libvirtd answers (``healthy``), and how it went."""

    healthy: bool
    detail: str


def in_window(restarts: Sequence[Restart], now: float, window: float) -> list[Restart]:
    """The restarts of the last ``window`` seconds, oldest first.

    One stamped up to ``window`` seconds in the future (the clock was set back since)
    counts as recent: it cannot be told apart from one.
    """
    return sorted((r for r in restarts if now - window < r.time <= now + window), key=_when)


def _when(restart: Restart) -> float:
    return restart.time


class RestartLog:
    """``[batch].state_dir/node/``: the restarts vmbatch made, and the restart lock."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / STATE_SUBDIR
        self.path = self.dir / "libvirtd-restarts.json"
        self.lock_path = self.dir / "libvirtd-restart.lock"

    def _ensure(self) -> None:
        try:
            # mkdir's mode is filtered by the umask; 0700 & ~umask is 0700 for any umask.
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise HostError(
                f"cannot create {self.dir}: {exc.strerror}",
                hint="check [batch].state_dir and that the hook runs as root",
            ) from exc

    def read(self) -> list[Restart]:
        """Every recorded restart; none if there is no record (an unreadable one is logged)."""
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise HostError(
                f"cannot read libvirtd's restarts in {self.path}: {exc.strerror}",
                hint="run as root",
            ) from exc
        except ValueError as exc:
            log.warning("libvirtd's restart record %s is unreadable (%s); ignoring it", self, exc)
            return []
        entries = data.get("restarts") if isinstance(data, dict) else None
        found = []
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            when, reason = entry.get("time"), entry.get("reason")
            if isinstance(when, int | float) and not isinstance(when, bool):
                found.append(Restart(float(when), str(reason)))
        return found

    def write(self, restarts: Sequence[Restart]) -> None:
        self._ensure()
        data = {"restarts": [{"time": r.time, "reason": r.reason} for r in restarts]}
        try:
            atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode(), 0o600)
        except OSError as exc:
            raise HostError(
                f"cannot record libvirtd's restart in {self.path}: {exc.strerror}",
                hint="check free space and [batch].state_dir",
            ) from exc

    @contextlib.contextmanager
    def locked(self, wait: float) -> Iterator[None]:
        """Hold the restart lock, waiting up to ``wait`` seconds (else :class:`LockBusy`)."""
        self._ensure()
        try:
            fd = os.open(
                self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise HostError(f"cannot open {self.lock_path}: {exc.strerror}") from exc
        try:
            for attempt in LIBVIRTD_RESTART_LOCK_POLICY.retrying(max_delay=wait):
                with attempt:
                    _flock(fd)
            yield
        finally:
            os.close(fd)  # releases the lock

    def __str__(self) -> str:
        return str(self.path)


def _flock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise LockBusy("another vmbatch hook is restarting libvirtd") from exc


# -- the probe ------------------------------------------------------------------------


def libvirtd_pid(cfg: Config) -> int | None:
    """The PID in ``[libvirt].pid_file``, if it holds one."""
    try:
        first = cfg.libvirt.pid_file.read_text().split()[:1]
    except OSError:
        return None
    return int(first[0]) if first and first[0].isdigit() and int(first[0]) > 0 else None


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a mapping (proc(5)); empty if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _running(status: dict[str, str]) -> bool:
    """A process exists and is not a zombie (dead, waiting to be reaped)."""
    return bool(status) and not status.get("State", "").startswith(("Z", "X"))


def rss_mib(cfg: Config) -> int | None:
    """libvirtd's resident memory (``VmRSS``) in MiB; None if its PID is not known."""
    pid = libvirtd_pid(cfg)
    if pid is None:
        return None
    fields = proc_status(pid).get("VmRSS", "").split()
    if not _running(proc_status(pid)) or not fields or not fields[0].isdigit():
        return None
    return int(fields[0]) // 1024  # proc(5): "VmRSS: ... kB"


def socket_path(uri: str) -> Path | None:
    """The UNIX socket of a local ``qemu:///system`` URI (``?socket=`` if it names one)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("qemu", "qemu+unix") or parts.netloc or parts.path != "/system":
        return None
    named = urllib.parse.parse_qs(parts.query).get("socket")
    return Path(named[0]) if named else SYSTEM_SOCKET


def check(cfg: Config) -> str | None:
    """None if libvirtd answers one call within ``[libvirt].timeout``, else why not (one line
    naming libvirtd). Bounded: at most the timeout, plus ``LibvirtConnectPolicy``'s waits
    while its socket refuses connections."""
    lv = cfg.libvirt
    try:
        with Connection(lv) as conn:
            conn.ping()
    except LibvirtTimeoutError:
        pid = libvirtd_pid(cfg)
        stopped = pid is not None and proc_status(pid).get("State", "").startswith("T")
        note = f" (pid {pid} is stopped)" if stopped else ""
        return f"libvirtd does not answer within {lv.timeout:g} s{note}"
    except LibvirtError as exc:
        return _unreachable(cfg, exc)
    return None


def _unreachable(cfg: Config, exc: LibvirtError) -> str:
    pid = libvirtd_pid(cfg)
    if pid is not None and not _running(proc_status(pid)):
        return f"libvirtd is dead (pid {pid} from {cfg.libvirt.pid_file} is gone)"
    sock = socket_path(cfg.libvirt.uri)
    if sock is not None and not sock.exists():
        return f"libvirtd is not running: its socket {sock} is missing"
    return f"libvirtd cannot be reached: {exc.message}"


# -- restarts -------------------------------------------------------------------------


def lock_wait(cfg: Config) -> float:
    """How long a hook waits for another one's restart: that hook's probe, its restart
    (``restart_wait``), the last probe in it, and the connection policy's waits."""
    return 2 * cfg.libvirt.timeout + cfg.libvirt.restart_wait + 15.0


def recover(cfg: Config, reason: str) -> bool:
    """Make libvirtd answer again after a call failed for ``reason``; False if it does not
    (restarts off or exhausted, or the restart did not help): the node is unhealthy."""
    return recovery(cfg, reason).healthy


def recovery(cfg: Config, reason: str) -> Recovery:
    """:func:`recover`, with a line that says how it went (for the caller's error)."""
    record = RestartLog(cfg.batch.state_dir)
    log.info("libvirtd failed a call (%s); checking it", reason)
    wait = lock_wait(cfg)
    try:
        with record.locked(wait):
            why = check(cfg)  # another hook may have restarted it while we waited
            if why is None:
                log.info("libvirtd answers (again)")
                return Recovery(True, "libvirtd answers again")
            return _restart(cfg, record, why)
    except LockBusy:
        why = check(cfg)
        if why is None:
            return Recovery(True, "libvirtd answers again")
        return Recovery(
            False, f"{why}; another vmbatch hook has been restarting it for over {wait:.0f} s"
        )
    except VmBatchError as exc:
        log.error("could not restart libvirtd: %s", exc)
        return Recovery(False, f"libvirtd was not restarted: {exc}")


def _restart(cfg: Config, record: RestartLog, why: str) -> Recovery:
    """Restart libvirtd (under the restart lock) unless the budget is spent."""
    lv = cfg.libvirt
    if not lv.restart_command or lv.restart_max == 0:
        detail = f"{why}; vmbatch does not restart it ([libvirt].restart_command or restart_max)"
        log.error("%s", detail)
        return Recovery(False, detail)
    now = time.time()
    recent = in_window(record.read(), now, lv.restart_window)
    window = f"in the last {lv.restart_window:.0f} s"
    if len(recent) >= lv.restart_max:
        detail = (
            f"{why}; libvirtd restarts exhausted ({len(recent)}/{lv.restart_max} {window},"
            " [libvirt].restart_max)"
        )
        log.error("%s", detail)
        return Recovery(False, detail)
    recent.append(Restart(now, why))
    record.write(recent)  # first: a restart that kills us still counts
    count = f"{len(recent)}/{lv.restart_max} {window}"
    log.warning("restarting libvirtd (%s): %s", count, why)
    started = time.monotonic()
    metrics.count(cfg, metrics.RESTARTS)
    try:
        process.run(lv.restart_command, timeout=lv.restart_wait)
    except CommandError as exc:
        detail = f"{why}; restarting libvirtd ({count}) failed: {exc}"
        log.error("%s", detail)
        return Recovery(False, detail)
    still = wait_ready(cfg, lv.restart_wait - (time.monotonic() - started))
    if still is not None:
        detail = (
            f"libvirtd was restarted ({count}) but {still.removeprefix('libvirtd ')} after"
            f" [libvirt].restart_wait {lv.restart_wait:g} s"
        )
        log.error("%s", detail)
        return Recovery(False, detail)
    pid = libvirtd_pid(cfg)
    log.warning(
        "libvirtd restarted (%s): %s%s", count, why, f"; now pid {pid}" if pid is not None else ""
    )
    return Recovery(True, f"libvirtd restarted ({count}): {why}")


def wait_ready(cfg: Config, limit: float) -> str | None:
    """Probe until libvirtd answers, for up to ``limit`` seconds (at least once); None once
    it does, else the last reason."""
    try:
        for attempt in LIBVIRTD_READY_POLICY.retrying(max_delay=max(limit, 0.0)):
            with attempt:
                why = check(cfg)
                if why is not None:
                    raise LibvirtUnavailableError(why)
    except LibvirtUnavailableError as exc:
        return exc.message
    return None


def maybe_restart_for_rss(cfg: Config) -> bool:
    """Restart libvirtd if its RSS passed ``[libvirt].max_rss_mib``; True if it was restarted
    and answers. Meant for between jobs (the prologue's start, the reaper); never raises: a
    failed or refused restart is logged and the caller goes on."""
    ceiling = cfg.libvirt.max_rss_mib
    if ceiling <= 0:
        return False
    rss = rss_mib(cfg)
    if rss is None or rss <= ceiling:
        return False
    record = RestartLog(cfg.batch.state_dir)
    try:
        with record.locked(lock_wait(cfg)):
            rss = rss_mib(cfg)  # another hook may have restarted it while we waited
            if rss is None or rss <= ceiling:
                return False
            why = f"its memory (RSS {rss} MiB) passed [libvirt].max_rss_mib ({ceiling} MiB)"
            return _restart(cfg, record, why).healthy
    except LockBusy:
        log.warning("libvirtd's RSS is over the ceiling, but another hook is restarting it")
    except VmBatchError as exc:
        log.error("could not restart libvirtd for its memory: %s", exc)
    return False
