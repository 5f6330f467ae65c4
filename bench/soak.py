#!/usr/bin/env python3
"""Soak: many short jobs through a real Slurm into vmbatch VMs, faults injected; count
what went right, what was explained, what was lost and what leaked (issue 14).

One single-node Slurm 22.05 (tests/system/slurmcluster.py, with vmbatch's hooks installed
as docs/admin-slurm.md says: tests/system/slurmhooks.py), one private libvirtd
(tests/system/libvirtd.py: the machine's own libvirtd serves other people's runs, and this
harness kills it), the tiny guest (scripts/register-guest), and an HTTP image server on
127.0.0.1 (tests/integration/httpserver.py). All are started by this process, stopped by
PID, and removed afterwards whatever happens.

``--jobs N`` jobs are submitted as an unprivileged user; ``--parallel K`` run at a time (the
node has K CPUs, a job takes one), and more are submitted only while fewer than
``--queue Q`` wait (defaults K=2, Q=5, like the reference's 20,000-job run). Each job prints
a unique token, 0-200 numbered lines, one line on stderr and its own run time, sleeps 0-2 s
and exits with a chosen status; afterwards its output (``slurm-<id>.out``) and exit code
(``scontrol show job`` and the jobcomp record) are checked.

A fraction ``--fault-rate`` of the jobs carries a fault, drawn from ``--faults`` (the
registry FAULTS below: each kind is one function, the image its victim uses, and the
outcome expected of the victim). A victim's fault is injected while that job is in flight,
so every effect on it has a cause on record; the other jobs in flight take it as collateral.

The harness plays the site's admin, and only as far as a site would: it runs the reaper
(``vmbatch cleanup --stale``) every ``--reaper-interval`` seconds (every 5 s while vmbatch
has the node drained), releases held jobs (at most 3 times each), and returns to service a
node that Slurm drained because the harness killed its Prolog or Epilog (Slurm drains for
any failed Prolog/Epilog; nothing can run after SIGKILL to prevent that). Every other drain
must be vmbatch's own and be undone by the reaper. It does not hurry requeued jobs: Slurm
starts them no sooner than ``cred_expire`` (120 s) later, and when an earlier version forced
``StartTime=now``, slurmd skipped the Prolog of the rerun on this node ("reissued job
credential"), so the starter found no VM.

Lost (must be 0): a job that ended neither right (exit code and output) nor explained (a
``vmbatch: error:`` reason in its output, a fault the harness injected into that job, or a
cancel by the harness). Leaked (must be 0, after a final reaper run): domains, QEMU
processes, disk files, state records, user directories, image in-use markers, processes of
the job user. Nodes left drained and drains nobody explained must be 0 too. The exit status
is 0 only if all of those are 0. The run stops at ``--jobs`` or ``--max-minutes``, whichever
comes first (jobs still in flight then are cancelled and counted as such).

Run as root after ``make test``'s set-up (the tiny guest built)::

    .venv/bin/python bench/soak.py --jobs 500 --fault-rate 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.httpserver import Resource, Server, serve  # noqa: E402
from tests.system.libvirtd import PrivateLibvirtd  # noqa: E402
from tests.system.slurmcluster import HostUser, SlurmCluster, parse_fields  # noqa: E402
from tests.system.slurmhooks import BIN, vmbatch_cluster  # noqa: E402

WORK = Path("/var/lib/vmbatch/soak")
GUEST = Path("/var/cache/vmbatch/guests/tiny")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}  # fmt: skip
#: Exit statuses the jobs choose from: not 199/200 (slurm.conf's RequeueExit/RequeueExitHold
#: would requeue the job itself) nor 65/69/75 (vmbatch's own, so a mix-up would not show).
EXIT_CODES = (0, 0, 0, 0, 1, 2, 3, 7, 42, 127, 255)
MAX_RELEASES = 3
LIBVIRTD_STOP_EXTRA = 5.0  # a SIGSTOP lasts [libvirt].timeout + this
#: A drain of vmbatch's that the reaper (run every 5 s meanwhile) has not undone after this
#: long is a finding; the harness resumes the node so that the rest of the run counts.
DRAIN_PATIENCE = 600.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    jobs: int = 500
    parallel: int = 2
    queue: int = 5
    fault_rate: float = 0.1
    faults: tuple[str, ...] = ()  # empty: every kind in FAULTS
    max_minutes: float = 240.0
    seed: int | None = None
    reaper_interval: float = 60.0
    guest: Path = GUEST
    boot_timeout: float = 60.0
    libvirt_timeout: float = 10.0
    libvirtd_restart_delay: float = 2.0
    server_down_seconds: float = 30.0
    keep: bool = False
    quiet: bool = False


# -- jobs and the report ------------------------------------------------------------------


@dataclass
class Job:
    index: int
    token: str
    image: str
    exit_code: int
    lines: int
    sleep: int
    fault: str | None
    #: When in its window the fault strikes (0-1), drawn with the rest of the schedule so
    #: that a seed replays the same jobs and faults (the threads draw nothing).
    fault_at: float = 0.0
    id: str = ""
    submitted: float = 0.0
    #: What the injection did ("" while nothing was done), and whether it hit.
    fault_note: str = ""
    injected: bool = False
    restarts: int = 0
    held: list[str] = field(default_factory=list)
    releases: int = 0
    cancelled: str = ""  # why the harness cancelled it
    final: dict[str, str] | None = None
    outcome: str = ""
    detail: str = ""
    runtime: float | None = None  # the job's own, measured in the guest

    def script(self) -> str:
        directive = f"#VMBATCH image={self.image}\n" if self.image != "demo" else ""
        return (
            f"#!/bin/sh\n{directive}read t0 _ </proc/uptime\n"
            f"echo soak-token {self.token}\n"
            f"i=0; while [ $i -lt {self.lines} ]; do echo soak-line $i; i=$((i + 1)); done\n"
            f"echo soak-stderr {self.token} >&2\n"
            f"sleep {self.sleep}\n"
            f"read t1 _ </proc/uptime\necho soak-time $t0 $t1\nexit {self.exit_code}\n"
        )


OUTCOMES = {
    "ok": "completed with the right exit code and output",
    "failed-vmbatch": "failed with a vmbatch reason",
    "killed": "killed by an injected fault (its job starter)",
    "cancelled": "cancelled by the harness",
    "lost": "LOST: neither right nor explained",
}


@dataclass
class Report:
    options: dict[str, object]
    seed: int
    minutes: float = 0.0
    submitted: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    requeued_ok: int = 0
    held_ok: int = 0
    held: list[str] = field(default_factory=list)  # "job: reason"
    failed_vmbatch: list[str] = field(default_factory=list)
    failed_expected: int = 0
    lost: list[str] = field(default_factory=list)
    faults: dict[str, Counter[str]] = field(default_factory=dict)
    drains_vmbatch: list[str] = field(default_factory=list)
    drains_hook_kill: list[str] = field(default_factory=list)
    drains_unexplained: list[str] = field(default_factory=list)
    drains_stuck: list[str] = field(default_factory=list)
    left_drained: str = ""
    leaks: dict[str, list[str]] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)
    libvirtd_rss_kib: dict[str, int] = field(default_factory=dict)
    libvirtd_restarts: int = 0
    libvirtd_died_unasked: int = 0
    overhead: list[float] = field(default_factory=list)
    reaper_runs: int = 0
    image_server: dict[str, int] = field(default_factory=dict)
    reaper_said: Counter[str] = field(default_factory=Counter)
    reaper_errors: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    kept: str = ""

    def leaked(self) -> int:
        return sum(len(v) for v in self.leaks.values())

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{len(self.lost)} job(s) lost")
        if self.leaked():
            out.append(f"{self.leaked()} leaked item(s)")
        if self.left_drained:
            out.append(f"node left drained: {self.left_drained}")
        if self.drains_unexplained:
            out.append(f"{len(self.drains_unexplained)} unexplained drain(s)")
        if self.drains_stuck:
            out.append(f"{len(self.drains_stuck)} drain(s) of vmbatch's the reaper never undid")
        if self.harness_errors:
            out.append(f"{len(self.harness_errors)} harness error(s)")
        return out

    def exit_status(self) -> int:
        return 1 if self.problems() else 0

    def render(self) -> str:
        o = self.outcomes
        w: list[str] = []

        def row(label: str, value: object) -> None:
            w.append(f"  {label:<58} {value}")

        opts = self.options
        w.append(
            f"soak: {self.submitted} jobs, K={opts['parallel']} Q={opts['queue']},"
            f" fault rate {opts['fault_rate']} of {','.join(map(str, opts['faults']))}"  # type: ignore[call-overload]
            f", seed {self.seed}, {self.minutes:.1f} min"
        )
        row("jobs submitted", self.submitted)
        row(OUTCOMES["ok"], o["ok"])
        row("  of which requeued (by vmbatch or Slurm), then completed", self.requeued_ok)
        row("  of which held, released by the harness, then completed", self.held_ok)
        row(
            OUTCOMES["failed-vmbatch"],
            f"{o['failed-vmbatch']} ({self.failed_expected} expected: broken-image victims)",
        )
        row(OUTCOMES["killed"], o["killed"])
        row(OUTCOMES["cancelled"] + " (time limit, or still held)", o["cancelled"])
        row("held with a reason (at some point)", len(self.held))
        row("lost (must be 0)", len(self.lost))
        for kind, c in sorted(self.faults.items()):
            row(f"fault {kind}", ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        row("drains by vmbatch (node fault), undone by the reaper", len(self.drains_vmbatch))
        row("drains by Slurm after an injected hook kill, resumed", len(self.drains_hook_kill))
        row("drains nobody explained (must be 0)", len(self.drains_unexplained))
        row("vmbatch drains the reaper left for 10 min (must be 0)", len(self.drains_stuck))
        row("nodes left drained (must be 0)", 1 if self.left_drained else 0)
        for what, items in sorted(self.leaks.items()):
            row(f"leaked {what} (must be 0)", len(items))
        d = self.disk
        row(
            "host disk in the job dir: before / peak / after",
            f"{_mib(d.get('job_before', 0))} / {_mib(d.get('job_peak', 0))}"
            f" / {_mib(d.get('job_after', 0))}",
        )
        row("image cache after", _mib(d.get("cache_after", 0)))
        r = self.libvirtd_rss_kib
        row(
            "libvirtd RSS: start / max / end",
            f"{r.get('start', 0) / 1024:.1f} / {r.get('max', 0) / 1024:.1f}"
            f" / {r.get('end', 0) / 1024:.1f} MiB",
        )
        row(
            "libvirtd restarts (by the harness / died unasked)",
            f"{self.libvirtd_restarts} / {self.libvirtd_died_unasked}",
        )
        if self.overhead:
            p = percentiles(self.overhead)
            row(
                "per-job overhead, s (start to end minus the job's own run)",
                f"p50 {p[50]:.2f}  p90 {p[90]:.2f}  p99 {p[99]:.2f}  (n={len(self.overhead)})",
            )
        s = self.image_server
        row(
            "image server: downloads / resumed (Range) / stalled / bytes",
            f"{s.get('requests', 0)} / {s.get('ranged', 0)} / {s.get('stalls', 0)}"
            f" / {s.get('bytes', 0)}",
        )
        said = ", ".join(f"{k} {v}" for k, v in sorted(self.reaper_said.items())) or "nothing"
        row("reaper runs", f"{self.reaper_runs} ({said})")
        for title, items in (
            ("failed with a vmbatch reason, not expected", self.failed_vmbatch),
            ("held", self.held),
            ("LOST", self.lost),
            ("drains by vmbatch", self.drains_vmbatch),
            ("drains after hook kills", self.drains_hook_kill),
            ("UNEXPLAINED drains", self.drains_unexplained),
            ("STUCK drains (resumed by the harness)", self.drains_stuck),
            ("reaper errors", self.reaper_errors),
            ("HARNESS errors", self.harness_errors),
        ):
            if items:
                w.append(f"{title}:")
                w += [f"    {line}" for line in items[:40]]
        for what, items in sorted(self.leaks.items()):
            if items:
                w.append(f"LEAKED {what}:")
                w += [f"    {line}" for line in items[:40]]
        if self.kept:
            w.append(f"work directory kept: {self.kept}")
        problems = self.problems()
        w.append("RESULT: " + ("; ".join(problems) if problems else "ok"))
        return "\n".join(w)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def percentiles(values: list[float]) -> dict[int, float]:
    """Nearest-rank percentiles 50, 90, 99."""
    s = sorted(values)
    return {p: s[min(len(s) - 1, max(0, -(-p * len(s) // 100) - 1))] for p in (50, 90, 99)}


# -- fault kinds ----------------------------------------------------------------------------

#: arm(soak, job) runs before the victim is submitted (main thread, quick); inject(soak, job)
#: runs in its own thread once the job id is known. Each returns a note on what it did; a
#: note starting with "missed" or "skipped" means the fault did not happen. A new kind is one
#: decorated function: e.g. vmbatch's root-only fault points, once they exist, would be an
#: ``arm`` that writes the point into a drop-in of ``soak.config`` (and an ``inject`` that
#: removes it once the victim's hook has passed it); a libvirtd that vmbatch restarts itself
#: ([libvirt] restart command) makes ``restart_libvirtd`` below unnecessary.
FaultFn = Callable[["Soak", Job], str]


@dataclass(frozen=True)
class FaultKind:
    name: str
    doc: str
    image: str = "demo"  # the image the victim job uses
    expect: str = "ok"  # the victim's outcome: "ok", "failed-vmbatch" or "killed"
    arm: FaultFn | None = None
    inject: FaultFn | None = None


FAULTS: dict[str, FaultKind] = {}


def fault(
    name: str, doc: str, *, image: str = "demo", expect: str = "ok", arm: bool = False
) -> Callable[[FaultFn], FaultFn]:
    """Register a fault kind: the decorated function is its ``inject`` (after the victim's
    submission, in a thread), or with ``arm=True`` its ``arm`` (before the submission)."""

    def register(fn: FaultFn) -> FaultFn:
        FAULTS[name] = FaultKind(
            name, doc, image, expect, arm=fn if arm else None, inject=None if arm else fn
        )
        return fn

    return register


@fault("libvirtd-kill", "SIGKILL libvirtd while the victim boots; restart it after a delay")
def _libvirtd_kill(soak: Soak, job: Job) -> str:
    if not soak.wait_running(job, "vmbatch-prologue"):
        return "missed: the prologue never showed"
    time.sleep(4 * job.fault_at)
    with soak.libvirtd_lock:
        pid = soak.libvirtd.signal(signal.SIGKILL)
        if pid is None:
            return "missed: libvirtd not running"
        soak.libvirtd.wait_dead(pid)
        time.sleep(soak.opts.libvirtd_restart_delay)
        soak.restart_libvirtd()
    return f"SIGKILL libvirtd {pid}, restarted {soak.opts.libvirtd_restart_delay:.0f} s later"


@fault("libvirtd-stop", "SIGSTOP libvirtd past [libvirt].timeout while the victim boots")
def _libvirtd_stop(soak: Soak, job: Job) -> str:
    if not soak.wait_running(job, "vmbatch-prologue"):
        return "missed: the prologue never showed"
    time.sleep(4 * job.fault_at)
    stop_for = soak.opts.libvirt_timeout + LIBVIRTD_STOP_EXTRA
    with soak.libvirtd_lock:
        pid = soak.libvirtd.signal(signal.SIGSTOP)
        if pid is None:
            return "missed: libvirtd not running"
        try:
            time.sleep(stop_for)
        finally:
            soak.libvirtd.signal(signal.SIGCONT)
    return f"SIGSTOP libvirtd {pid} for {stop_for:.0f} s"


def _evict(soak: Soak, job: Job) -> str:
    """Remove the remote image from the node's cache so that the victim downloads it."""
    r = soak.vmbatch("image", "rm", "remote")
    if r.returncode != 0:
        return f"skipped: could not evict the remote image ({r.stderr.strip()[-200:]})"
    return ""


@fault(
    "image-stall",
    "the image server stalls mid-download past [cache].read_timeout",
    image="remote",
    arm=True,
)
def _image_stall(soak: Soak, job: Job) -> str:
    if note := _evict(soak, job):
        return note
    res = soak.server.state.resources[soak.server.path]
    res.stall_after = len(res.body) // 2
    soak.server.stalls += 1
    res.stall_seconds = soak.read_timeout + 3
    return f"next download stalls {res.stall_seconds:.0f} s after {res.stall_after} bytes"


@fault(
    "image-down",
    "the image server refuses connections for --server-down-seconds",
    image="remote",
    arm=True,
)
def _image_down(soak: Soak, job: Job) -> str:
    if note := _evict(soak, job):
        return note
    if not soak.server.down_for(soak.opts.server_down_seconds):
        return "skipped: the server is down already"
    return f"image server down for {soak.opts.server_down_seconds:.0f} s"


@fault(
    "broken-image",
    "the victim asks for an image whose kernel never finds its init (rdinit=/nonexistent)",
    image="broken",
    expect="failed-vmbatch",
    arm=True,
)
def _broken_image(soak: Soak, job: Job) -> str:
    return "job uses image 'broken'"


@fault(
    "ssh-refused",
    "the guest's sshd refuses logins for its first seconds (keys installed late)",
    image="sshlate",
    arm=True,
)
def _ssh_refused(soak: Soak, job: Job) -> str:
    return "job uses image 'sshlate'"


def _kill_hook(soak: Soak, job: Job, program: str, window: float) -> str:
    pidfd = soak.wait_hook(job, program)
    if pidfd is None:
        return f"missed: no {program} seen"
    try:
        time.sleep(window * job.fault_at)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return f"missed: {program} ended first"
    finally:
        os.close(pidfd)
    soak.hook_killed_at = time.monotonic()
    return f"SIGKILL {program}"


@fault("prologue-kill", "SIGKILL the victim's Prolog (vmbatch-prologue) at a random moment")
def _prologue_kill(soak: Soak, job: Job) -> str:
    return _kill_hook(soak, job, "vmbatch-prologue", 4.0)


@fault("epilogue-kill", "SIGKILL the victim's Epilog (vmbatch-epilogue) at a random moment")
def _epilogue_kill(soak: Soak, job: Job) -> str:
    return _kill_hook(soak, job, "vmbatch-epilogue", 0.5)


@fault(
    "starter-kill",
    "SIGKILL the victim's job starter (vmbatch-starter, as the user) while the job runs",
    expect="killed",
)
def _starter_kill(soak: Soak, job: Job) -> str:
    return _kill_hook(soak, job, "vmbatch-starter", 1.0)


# -- guest images -------------------------------------------------------------------------


def _cpio_entries(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, mode, body) of each member of an uncompressed newc cpio archive
    (the "new ASCII" format of cpio(5); the kernel's initramfs format)."""
    pos = 0
    while pos + 110 <= len(data):
        if data[pos : pos + 6] not in (b"070701", b"070702"):
            break
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode()
        start = (name_end + 3) & ~3
        body = data[start : start + size]
        pos = (start + size + 3) & ~3
        if name == "TRAILER!!!":
            while pos < len(data) and data[pos] == 0:
                pos += 1
            continue
        yield name, mode, body


def _cpio_newc(files: dict[str, tuple[int, bytes]]) -> bytes:
    """An uncompressed newc archive of FILES (name -> (mode, body)), trailer included."""
    out = bytearray()

    def member(ino: int, name: str, mode: int, body: bytes) -> None:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(raw), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(body)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, (mode, body)) in enumerate(sorted(files.items()), start=1):
        member(ino, name, mode, body)
    member(0, "TRAILER!!!", 0, b"")
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


#: Shell inserted in the tiny guest's /init before it hands over to busybox init (which
#: starts dropbear): every authorized_keys file is hidden, and put back a few seconds later.
SSH_LATE = """
# soak (bench/soak.py): refuse SSH logins for the first seconds, as a slow guest would.
soak_keys=$(find / -xdev -name authorized_keys 2>/dev/null)
for k in $soak_keys; do mv "$k" "$k.soak-late"; done
( sleep 4; for k in $soak_keys; do mv "$k.soak-late" "$k"; done; msg "soak: keys back" ) &
"""


def sshlate_initrd(initrd: Path, dest: Path) -> None:
    """The tiny guest's initramfs with a second archive appended that replaces /init by one
    that installs the SSH keys late (the kernel unpacks concatenated archives in order,
    later members replacing earlier ones: Documentation/driver-api/early-userspace)."""
    data = initrd.read_bytes()
    init = next((body for name, _, body in _cpio_entries(data) if name == "init"), None)
    if init is None:
        raise RuntimeError(f"{initrd}: no /init member (not an uncompressed newc archive?)")
    text = init.decode()
    anchor = text.rfind("\nexec /sbin/init")
    if anchor < 0:
        raise RuntimeError(f"{initrd}: /init does not end in `exec /sbin/init`")
    patched = text[:anchor] + "\n" + SSH_LATE + text[anchor:]
    dest.write_bytes(data + _cpio_newc({"init": (0o100755, patched.encode())}))
    dest.chmod(0o644)


def catalog(soak: Soak, demo: str) -> str:
    """The [images.*] tables: demo (the tiny guest), broken, sshlate and remote (its copies)."""
    body = demo.split("[images.demo]", 1)[1]
    broken = body.replace('cmdline = "', 'cmdline = "rdinit=/nonexistent ')
    initrd = re.search(r'^initrd = "(.*)"$', body, re.M)
    if initrd is None:
        raise RuntimeError("register-guest printed no initrd for the tiny guest")
    late = soak.root / "images" / "initrd-sshlate.cpio"
    sshlate_initrd(Path(initrd.group(1)), late)
    sshlate = body.replace(initrd.group(0), f'initrd = "{late}"')
    source = re.search(r'^source = "(.*)"$', body, re.M)
    assert source is not None
    # The tiny guest's disk is 196 KiB, less than one read of vmbatch's download (256 KiB):
    # a stall could never be resumed. 4 MiB of filler where the guest never looks fix that.
    remote_disk = soak.root / "images" / "remote.qcow2"
    shutil.copyfile(source.group(1), remote_disk)
    subprocess.run(
        ["/usr/bin/qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 32M 4M", str(remote_disk)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    data = remote_disk.read_bytes()
    soak.server.state.resources[soak.server.path] = Resource(data)
    sha = hashlib.sha256(data).hexdigest()
    remote = body.replace(source.group(0), f'source = "{soak.server.url}"\nsha256 = "{sha}"')
    return f"{demo}\n[images.broken]{broken}\n[images.sshlate]{sshlate}\n[images.remote]{remote}\n"


# -- the image server -----------------------------------------------------------------------


class ImageServer:
    """The remote image on 127.0.0.1, which a fault can take down and bring back."""

    path = "/tiny/disk.qcow2"

    def __init__(self) -> None:
        self.state = Server()
        self._cm: contextlib.AbstractContextManager[Server] | None = None
        self._lock = threading.Lock()
        self._down = False
        self.port = 0
        self.stalls = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def up(self) -> None:
        self._cm = serve(self.port, self.state)
        self._cm.__enter__()
        self.port = self.state.port

    def stop(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None

    def down_for(self, seconds: float) -> bool:
        with self._lock:
            if self._down:
                return False
            self._down = True
            self.stop()

        def back() -> None:
            with self._lock:
                self.up()
                self._down = False

        timer = threading.Timer(seconds, back)
        timer.daemon = True
        timer.start()
        return True


# -- processes -------------------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _proc_alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _ancestors(pid: int, depth: int = 6) -> list[int]:
    out = []
    for _ in range(depth):
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            break
        pid = int(stat.rsplit(b")", 1)[1].split()[1])
        out.append(pid)
    return out


# -- the soak -------------------------------------------------------------------------------


class Soak:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(10**6)
        self.rng = random.Random(self.seed)  # noqa: S311 - a replayable schedule, not secrets
        self.kinds = [FAULTS[k] for k in (opts.faults or tuple(FAULTS))]
        self.report = Report(
            options={
                **dataclasses.asdict(opts),
                "guest": str(opts.guest),
                "faults": [k.name for k in self.kinds],
            },
            seed=self.seed,
        )
        WORK.mkdir(mode=0o755, parents=True, exist_ok=True)
        WORK.chmod(0o755)
        self.root = WORK / uuid.uuid4().hex[:8]
        self.root.mkdir(mode=0o755)
        for sub in ("images", "jobs", "cache", "state", "run", "console"):
            (self.root / sub).mkdir(mode=0o755)
        self.config = self.root / "vmbatch.toml"
        self.accounting = self.root / "accounting.jsonl"
        self.read_timeout = 5.0
        self.libvirtd = PrivateLibvirtd(self.root / "libvirt")
        self.libvirtd_lock = threading.RLock()
        self.server = ImageServer()
        self.cluster: SlurmCluster | None = None
        self.user: HostUser | None = None
        self.jobs: dict[str, Job] = {}
        self.order: list[Job] = []
        self.threads: list[threading.Thread] = []
        self.stopping = threading.Event()
        #: SIGINT/SIGTERM: end as at the time limit (cancel, settle, count, report).
        self.interrupted = threading.Event()
        self.hook_killed_at = -1e9
        self.drain_seen = ""
        self.drained_since = 0.0
        self.last_reaper = 0.0

    # -- set-up -------------------------------------------------------------------------

    def write_config(self) -> None:
        demo = subprocess.run(
            [str(ROOT / "scripts" / "register-guest"), "demo", str(self.opts.guest.resolve())],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        r = self.root
        self.config.write_text(
            f"""# bench/soak.py
[libvirt]
uri = "{self.libvirtd.uri}"
timeout = {self.opts.libvirt_timeout}
[vm]
boot_timeout = {self.opts.boot_timeout}
outbound_network = false
[paths]
job_dir = "{r}/jobs"
cache_dir = "{r}/cache"
console_log_dir = "{r}/console"
[cache]
read_timeout = {self.read_timeout}
connect_timeout = 5
[batch]
default_image = "demo"
user_images = ["broken", "sshlate", "remote"]
state_dir = "{r}/state"
user_dir = "{r}/run"
accounting_log = "{self.accounting}"
{catalog(self, demo)}"""
        )
        self.config.chmod(0o644)

    def vmbatch(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "vmbatch"), "-c", str(self.config), *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    # -- libvirtd -----------------------------------------------------------------------

    def restart_libvirtd(self) -> None:
        """The harness restarts libvirtd: main has no [libvirt].restart_command yet. Once it
        has, point it at `tests/system/libvirtd.py`'s start and drop this step."""
        self.libvirtd.start()
        self.report.libvirtd_restarts += 1

    def check_libvirtd(self) -> None:
        """libvirtd dead without a fault at work (OOM, crash): a finding; restart it."""
        if not self.libvirtd_lock.acquire(blocking=False):
            return  # a fault is working on it
        try:
            if self.libvirtd.pid() is None:
                self.report.libvirtd_died_unasked += 1
                log("libvirtd died without an injected fault: restarting it")
                self.restart_libvirtd()
            rss = self.libvirtd.rss_kib() or 0
            self.report.libvirtd_rss_kib["max"] = max(
                rss, self.report.libvirtd_rss_kib.get("max", 0)
            )
        finally:
            self.libvirtd_lock.release()

    # -- hook processes -----------------------------------------------------------------

    def find_hook(self, job_id: str, program: str) -> int | None:
        """PID of this job's ``program`` in our cluster: Prolog/Epilog are children of our
        slurmd (its PID is ours) with SLURM_JOB_ID in their environment; the starter
        (RunTimeRun) carries the job id in its argv and our cluster's marker."""
        assert self.cluster is not None
        slurmd = self.cluster.procs["slurmd"].pid
        needle = f"/{program}".encode()
        for pid in _pids():
            argv = _read(f"/proc/{pid}/cmdline").split(b"\0")
            if not any(a.endswith(needle) for a in argv[:2]):
                continue
            if program == "vmbatch-starter":
                env = _read(f"/proc/{pid}/environ").split(b"\0")
                marker = f"VMBATCH_TEST_SLURM={self.cluster.dir}".encode()
                if marker in env and job_id.encode() in argv and b"slurm" in argv:
                    return pid
            elif slurmd in _ancestors(pid):
                env = _read(f"/proc/{pid}/environ").split(b"\0")
                if f"SLURM_JOB_ID={job_id}".encode() in env:
                    return pid
        return None

    def wait_hook(self, job: Job, program: str, timeout: float = 600) -> int | None:
        """A pidfd of the job's ``program`` once it runs (None: the job ended first)."""
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set() and time.monotonic() < deadline:
            pid = self.find_hook(job.id, program)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    fd = os.pidfd_open(pid)
                    if self.find_hook(job.id, program) == pid:  # still that process
                        return fd
                    os.close(fd)
            if job.outcome:
                return None
            time.sleep(0.05)  # polling with a deadline
        return None

    def wait_running(self, job: Job, program: str) -> bool:
        fd = self.wait_hook(job, program)
        if fd is None:
            return False
        os.close(fd)
        return True

    # -- jobs ---------------------------------------------------------------------------

    def new_job(self, index: int) -> Job:
        kind = self.rng.choice(self.kinds) if self.rng.random() < self.opts.fault_rate else None
        return Job(
            index=index,
            token=uuid.uuid4().hex,
            image=kind.image if kind else "demo",
            exit_code=self.rng.choice(EXIT_CODES),
            lines=self.rng.choice((0, 1, 5, 50, 200)),
            sleep=self.rng.choice((0, 0, 1, 2)),
            fault=kind.name if kind else None,
            fault_at=self.rng.random(),
        )

    def submit(self) -> Job:
        assert self.cluster is not None and self.user is not None
        job = self.new_job(len(self.order))
        kind = FAULTS[job.fault] if job.fault else None
        if kind and kind.arm:
            self._note(job, kind.arm(self, job))
        job.id = self.cluster.sbatch(
            job.script(), self.user.name, self.user.home, "--time=10", f"--job-name=soak{job.index}"
        )
        job.submitted = time.monotonic()
        self.jobs[job.id] = job
        self.order.append(job)
        self.report.submitted += 1
        if kind and kind.inject:
            t = threading.Thread(target=self._inject, args=(kind, job), daemon=True)
            t.start()
            self.threads.append(t)
        return job

    def _inject(self, kind: FaultKind, job: Job) -> None:
        assert kind.inject is not None
        try:
            self._note(job, kind.inject(self, job))
        except Exception as exc:  # noqa: BLE001 - a harness bug is reported, not hidden
            self.report.harness_errors.append(f"fault {kind.name} on job {job.id}: {exc!r}")
            traceback.print_exc()

    def _note(self, job: Job, note: str) -> None:
        job.fault_note = note
        job.injected = not note.startswith(("missed", "skipped"))
        counts = self.report.faults.setdefault(job.fault or "?", Counter())
        counts["injected" if job.injected else note.split(":")[0]] += 1
        if not self.opts.quiet:
            log(f"job {job.id or '(next)'} #{job.index}: fault {job.fault}: {note}")

    def poll(self) -> dict[str, dict[str, str]]:
        assert self.cluster is not None
        out = self.cluster.scontrol("show", "job", "-o")
        view = {}
        for line in out.splitlines():
            if line.startswith("JobId="):
                f = parse_fields(line)
                view[f["JobId"]] = f
        return view

    def update(self, view: dict[str, dict[str, str]]) -> None:
        assert self.cluster is not None
        for job_id, f in view.items():
            job = self.jobs.get(job_id)
            if job is None or job.outcome:
                continue
            job.restarts = max(job.restarts, int(f.get("Restarts", "0") or 0))
            state = f.get("JobState", "")
            if state in FINISHED:
                self.finish(job, f)
            elif state in ("PENDING", "SPECIAL_EXIT") and _held(f):
                self.release(job, f)

    def release(self, job: Job, f: dict[str, str]) -> None:
        assert self.cluster is not None
        reason = f.get("Reason", "")
        said = _vmbatch_lines(self.output(job))
        note = f"{f.get('JobState')} {reason}" + (f" / {said[-1][:160]}" if said else "")
        if not job.held or job.held[-1] != note:
            job.held.append(note)
        if job.releases >= MAX_RELEASES or "DRAIN" in self.cluster.node().get("State", ""):
            return  # left held (cancelled at the end), or released once the node is back
        job.releases += 1
        try:
            self.cluster.scontrol("release", job.id)
        except RuntimeError as exc:
            log(f"job {job.id}: release failed: {exc}")

    def output(self, job: Job) -> str:
        assert self.user is not None
        path = self.user.home / f"slurm-{job.id}.out"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def finish(self, job: Job, f: dict[str, str]) -> None:
        """Classify a job that ended."""
        job.final = f
        out = self.output(job)
        state, code = f.get("JobState", ""), f.get("ExitCode", "")
        expected_state = "COMPLETED" if job.exit_code == 0 else "FAILED"
        tokens = out.count(f"soak-token {job.token}\n")
        lines = re.findall(r"^soak-line (\d+)$", out, re.M)
        timing = re.search(r"^soak-time ([\d.]+) ([\d.]+)$", out, re.M)
        right_output = (
            tokens == 1
            and lines == [str(i) for i in range(job.lines)]
            and f"soak-stderr {job.token}\n" in out
            and timing is not None
        )
        said = _vmbatch_lines(out)
        if (state, code) == (expected_state, f"{job.exit_code}:0") and right_output:
            job.outcome = "ok"
            assert timing is not None
            job.runtime = float(timing.group(2)) - float(timing.group(1))
        elif job.cancelled and state == "CANCELLED":
            job.outcome, job.detail = "cancelled", job.cancelled
        elif said and state == "FAILED" and tokens == 0:
            job.outcome, job.detail = "failed-vmbatch", said[-1][:300]
        elif (
            job.fault is not None
            and FAULTS[job.fault].expect == "killed"
            and job.injected
            and state == "FAILED"
            and code in ("0:9", "137:0")
        ):
            job.outcome, job.detail = "killed", f"starter SIGKILLed, ExitCode {code}"
        else:
            job.outcome = "lost"
            job.detail = (
                f"state {state} ExitCode {code} (expected {expected_state} {job.exit_code}:0),"
                f" token seen {tokens}x, lines ok {lines == [str(i) for i in range(job.lines)]},"
                f" restarts {job.restarts}, fault {job.fault} {job.fault_note!r},"
                f" vmbatch said {said[-1:]}"
            )
        if not self.opts.quiet and (job.outcome != "ok" or job.fault or job.restarts):
            log(
                f"job {job.id} #{job.index} ({job.image}, fault {job.fault}):"
                f" {job.outcome} {job.detail}".rstrip()
            )

    def queued(self, view: dict[str, dict[str, str]]) -> int:
        return sum(
            1
            for job_id, f in view.items()
            if job_id in self.jobs
            and f.get("JobState") == "PENDING"
            and not _held(f)
            and not self.jobs[job_id].outcome
        )

    # -- node and reaper ----------------------------------------------------------------

    def check_node(self) -> None:
        assert self.cluster is not None
        node = self.cluster.node()
        if "DRAIN" not in node.get("State", ""):
            self.drain_seen = ""
            return
        reason = node.get("Reason", "")
        now = time.monotonic()
        if reason != self.drain_seen:
            self.drain_seen, self.drained_since = reason, now
            log(f"node drained: {reason}")
            if reason.startswith("vmbatch:"):
                self.report.drains_vmbatch.append(reason)
        if reason.startswith("vmbatch:"):
            if now - self.drained_since > DRAIN_PATIENCE:
                # The reaper should have undone it long ago: a finding. Resume it, as an
                # admin would, so that the rest of the run still counts.
                self.report.drains_stuck.append(reason)
                log(f"STUCK: drained {DRAIN_PATIENCE:.0f} s by vmbatch, resuming: {reason}")
                self._resume()
            elif now - self.last_reaper > 5:
                self.reaper("vmbatch drained the node")
        elif time.monotonic() - self.hook_killed_at < 120:
            self.report.drains_hook_kill.append(reason)
            log(f"resuming the node (drained after an injected hook kill): {reason}")
            self._resume()
        else:
            self.report.drains_unexplained.append(reason)
            log(f"UNEXPLAINED drain, resuming the node: {reason}")
            self._resume()

    def _resume(self) -> None:
        assert self.cluster is not None
        try:
            self.cluster.resume()
        except (RuntimeError, TimeoutError) as exc:
            log(f"could not resume the node: {exc}")

    def reaper(self, why: str) -> None:
        self.last_reaper = time.monotonic()
        r = self.vmbatch("cleanup", "--stale")
        self.report.reaper_runs += 1
        for line in r.stdout.splitlines():
            key = (
                "returned the node to service"
                if "returned to service" in line
                else "cleaned up a job"
                if "cleaned up" in line
                else "said other things"
            )
            self.report.reaper_said[key] += 1
            log(f"reaper ({why}): {line}")
        if r.returncode not in (0, 75):
            self.report.reaper_errors.append(f"exit {r.returncode}: {r.stderr.strip()[-300:]}")

    # -- the run ------------------------------------------------------------------------

    def loop(self) -> None:
        opts = self.opts
        start = time.monotonic()
        deadline = start + opts.max_minutes * 60
        next_reaper = start + opts.reaper_interval
        next_status = start + 30
        cancelled_at = 0.0
        while True:
            now = time.monotonic()
            if self.interrupted.is_set():
                deadline = min(deadline, now)
            view = self.poll()
            self.update(view)
            self.check_node()
            self.check_libvirtd()
            self.sample_disk()
            if now >= next_reaper:
                self.reaper("periodic")
                next_reaper = now + opts.reaper_interval
            if now < deadline:
                queued = self.queued(view)
                while self.report.submitted < opts.jobs and queued < opts.queue:
                    self.submit()
                    queued += 1
            open_jobs = [j for j in self.order if not j.outcome]
            if not open_jobs and (self.report.submitted >= opts.jobs or now >= deadline):
                return
            if now >= deadline and not cancelled_at:
                why = "interrupted" if self.interrupted.is_set() else "time limit reached"
                log(f"{why}: cancelling the {len(open_jobs)} jobs still in flight")
                cancelled_at = now
                self.cancel(open_jobs, why)
            held = [j for j in open_jobs if j.releases >= MAX_RELEASES and j.held]
            for j in held:
                if not j.cancelled and _held(view.get(j.id, {})):
                    self.cancel([j], f"still held after {MAX_RELEASES} releases")
            if cancelled_at and now > cancelled_at + 900:
                for j in open_jobs:
                    j.outcome, j.detail = "lost", "did not end within 15 min of its cancel"
                return
            if now >= next_status:
                next_status = now + 30
                self.status(view)
            time.sleep(0.5)  # polling Slurm

    def cancel(self, jobs: list[Job], why: str) -> None:
        assert self.cluster is not None
        for j in jobs:
            j.cancelled = why
        subprocess.run(
            ["scancel", *[j.id for j in jobs]],
            env=self.cluster.env(), capture_output=True, timeout=60, check=False,
        )  # fmt: skip

    def status(self, view: dict[str, dict[str, str]]) -> None:
        c = Counter(j.outcome or "open" for j in self.order)
        states = Counter(f.get("JobState") for f in view.values() if f["JobId"] in self.jobs)
        log(
            f"status: submitted {self.report.submitted}/{self.opts.jobs}; "
            + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            + f"; slurm {dict(states)}; libvirtd restarts {self.report.libvirtd_restarts}"
        )

    def sample_disk(self) -> None:
        used = _du(self.root / "jobs")
        self.report.disk["job_peak"] = max(used, self.report.disk.get("job_peak", 0))

    # -- the end ------------------------------------------------------------------------

    def settle(self) -> None:
        """Faults over, node idle, a last reaper run; then count what is left."""
        assert self.cluster is not None
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=120)
        with self.libvirtd_lock:
            self.libvirtd.signal(signal.SIGCONT)
            if self.libvirtd.pid() is None:
                self.restart_libvirtd()
        deadline = time.monotonic() + 300
        while "COMPLETING" in self.cluster.node().get("State", ""):
            if time.monotonic() > deadline:
                self.report.harness_errors.append("node still COMPLETING 300 s after the end")
                break
            time.sleep(0.5)  # polling with a deadline
        self.check_node()
        for _ in range(3):
            self.reaper("final")
            if not self.report.reaper_errors or "exit 75" not in self.report.reaper_errors[-1]:
                break
        node = self.cluster.node()
        if "DRAIN" in node.get("State", ""):
            self.report.left_drained = node.get("Reason", "?")
            self.cluster.resume()
        self.crosscheck_jobcomp()
        self.count_leaks()
        self.keep_evidence()
        self.overheads()
        self.report.disk["job_after"] = _du(self.root / "jobs")
        self.report.disk["cache_after"] = _du(self.root / "cache")
        self.report.libvirtd_rss_kib["end"] = self.libvirtd.rss_kib() or 0
        hits = self.server.state.hits
        self.report.image_server = {
            "requests": len(hits),
            "ranged": sum(1 for h in hits if h.range),
            "stalls": self.server.stalls,
            "bytes": sum(h.sent for h in hits),
        }

    def keep_evidence(self) -> None:
        """Slurm's logs and the output of every job that did not simply succeed, into the
        work directory (kept when something went wrong or with --keep)."""
        assert self.cluster is not None
        shutil.copytree(self.cluster.dir / "log", self.root / "slurm-log", dirs_exist_ok=True)
        outputs = self.root / "outputs"
        outputs.mkdir(exist_ok=True)
        for job in self.order:
            if job.outcome != "ok" or job.fault or job.restarts:
                (outputs / f"slurm-{job.id}.out").write_text(self.output(job))

    def crosscheck_jobcomp(self) -> None:
        """The jobcomp record (Slurm's accounting of the last end) must agree."""
        assert self.cluster is not None
        last: dict[str, dict[str, str]] = {}
        for line in self.cluster.jobcomp():
            f = parse_fields(line)
            if "JobId" in f:
                last[f["JobId"]] = f
        for job in self.order:
            rec = last.get(job.id)
            if job.outcome in ("ok", "failed-vmbatch", "killed") and (
                rec is None
                or job.final is None
                or (rec.get("ExitCode"), rec.get("JobState"))
                != (job.final.get("ExitCode"), job.final.get("JobState"))
            ):
                got = (rec or {}).get("ExitCode"), (rec or {}).get("JobState")
                job.detail = f"jobcomp says {got}, scontrol said {job.final}; was {job.outcome}"
                job.outcome = "lost"

    def count_leaks(self) -> None:
        leaks = self.report.leaks
        r = subprocess.run(
            ["/usr/bin/virsh", "-c", self.libvirtd.uri, "list", "--all", "--name"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        leaks["domains"] = [n for n in r.stdout.split() if n]
        if r.returncode:
            self.report.harness_errors.append(f"virsh list failed: {r.stderr.strip()}")
        leaks["QEMU processes"] = [str(p) for p in self.qemu_pids()]
        leaks["disk files"] = [str(p) for p in (self.root / "jobs").rglob("*")]
        leaks["state records"] = [
            p.name for p in (self.root / "state").iterdir() if p.name != "node"
        ]
        leaks["user dirs"] = [p.name for p in (self.root / "run").iterdir()]
        leaks["image in-use markers"] = [
            str(p) for d in (self.root / "cache").rglob("*.jobs") for p in d.iterdir()
        ]
        assert self.user is not None
        uid = self.user.uid
        leaks["job-user processes"] = [
            str(p) for p in _pids() if _proc_alive(p) and _owner(p) == uid
        ]

    def qemu_pids(self) -> list[int]:
        """QEMU processes of our jobs (their disks lie under our root), never another's."""
        needle = f"{self.root}/".encode()
        return [
            pid
            for pid in _pids()
            if b"qemu-system" in _read(f"/proc/{pid}/cmdline").split(b"\0")[0]
            and needle in _read(f"/proc/{pid}/cmdline")
            and _proc_alive(pid)
        ]

    def overheads(self) -> None:
        last: dict[str, dict[str, object]] = {}
        if self.accounting.exists():
            for line in self.accounting.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    last[str(rec.get("job_id"))] = rec
        for job in self.order:
            rec = last.get(job.id)
            if job.outcome != "ok" or rec is None or job.runtime is None:
                continue
            # From the Prolog's start to the accounting line (the Epilog's end).
            start, end = rec.get("prologue_started"), rec.get("time")
            if isinstance(start, int | float) and isinstance(end, int | float):
                self.report.overhead.append(end - start - job.runtime)

    def summarize(self) -> None:
        rep = self.report
        for job in self.order:
            rep.outcomes[job.outcome or "lost"] += 1
            if job.outcome == "ok" and job.restarts:
                rep.requeued_ok += 1
            if job.outcome == "ok" and job.held:
                rep.held_ok += 1
            if job.held:
                rep.held.append(f"job {job.id} ({job.fault}): {' | '.join(job.held)}"[:400])
            if job.outcome == "failed-vmbatch":
                if job.fault is not None and FAULTS[job.fault].expect == "failed-vmbatch":
                    rep.failed_expected += 1
                else:
                    rep.failed_vmbatch.append(f"job {job.id} (fault {job.fault}): {job.detail}")
            if job.outcome in ("lost", ""):
                rep.lost.append(f"job {job.id} #{job.index}: {job.detail}")

    # -- teardown -----------------------------------------------------------------------

    def destroy_leftovers(self) -> None:
        """Whatever leaked is counted already; now remove it so the machine stays clean."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            names = subprocess.run(
                ["/usr/bin/virsh", "-c", self.libvirtd.uri, "list", "--name"],
                capture_output=True, text=True, timeout=60, check=False,
            ).stdout.split()  # fmt: skip
            for name in names:
                subprocess.run(
                    ["/usr/bin/virsh", "-c", self.libvirtd.uri, "destroy", name],
                    capture_output=True, timeout=60, check=False,
                )  # fmt: skip
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                fd = os.pidfd_open(pid)
                try:
                    if pid in self.qemu_pids():
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                finally:
                    os.close(fd)


def _held(f: dict[str, str]) -> bool:
    return f.get("JobState") == "SPECIAL_EXIT" or (
        f.get("JobState") == "PENDING"
        and ("held" in f.get("Reason", "").lower() or f.get("Priority") == "0")
    )


def _vmbatch_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("vmbatch: error:")]


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _free_uid() -> int:
    import grp

    for uid in range(4800, 6000):
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            return uid
    raise RuntimeError("no free uid in 4800-5999")


def run(opts: Options) -> Report:
    """The whole soak; everything it started is stopped before it returns."""
    soak = Soak(opts)
    rep = soak.report
    t0 = time.monotonic()
    log(f"soak in {soak.root}: seed {soak.seed}, faults {[k.name for k in soak.kinds]}")
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: soak.interrupted.set())
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(soak.libvirtd)
            stack.callback(soak.destroy_leftovers)
            soak.server.up()
            stack.callback(soak.server.stop)
            rep.libvirtd_rss_kib["start"] = soak.libvirtd.rss_kib() or 0
            soak.write_config()
            first_id = random.SystemRandom().randrange(10**6, 9 * 10**6)
            soak.cluster = vmbatch_cluster(
                soak.root,
                soak.config,
                extra_conf=[f"FirstJobId={first_id}"],
                cpus=opts.parallel,
            )
            stack.enter_context(soak.cluster)
            uid = _free_uid()
            soak.user = stack.enter_context(soak.cluster.test_user(f"vmsoak{uid}", uid))
            rep.disk["job_before"] = _du(soak.root / "jobs")
            try:
                soak.loop()
            finally:
                soak.stopping.set()
                try:
                    soak.settle()
                finally:
                    soak.summarize()
    except Exception as exc:  # noqa: BLE001 - reported with everything counted so far
        rep.harness_errors.append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        rep.minutes = (time.monotonic() - t0) / 60
        if opts.keep or rep.problems():
            rep.kept = str(soak.root)
        else:
            shutil.rmtree(soak.root, ignore_errors=True)
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="fault kinds: " + "; ".join(f"{k.name}: {k.doc}" for k in FAULTS.values()),
    )
    d = Options()
    ap.add_argument("--jobs", type=int, default=d.jobs, help="jobs to submit (N)")
    ap.add_argument("--parallel", type=int, default=d.parallel, help="jobs at a time (K)")
    ap.add_argument("--queue", type=int, default=d.queue, help="queue depth (Q)")
    ap.add_argument("--fault-rate", type=float, default=d.fault_rate,
                    help="fraction of jobs that carry a fault")  # fmt: skip
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help="comma-separated fault kinds (see below)")  # fmt: skip
    ap.add_argument("--max-minutes", type=float, default=d.max_minutes)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--reaper-interval", type=float, default=d.reaper_interval)
    ap.add_argument("--guest", type=Path, default=d.guest)
    ap.add_argument("--boot-timeout", type=float, default=d.boot_timeout)
    ap.add_argument("--libvirt-timeout", type=float, default=d.libvirt_timeout)
    ap.add_argument("--server-down-seconds", type=float, default=d.server_down_seconds)
    ap.add_argument("--json", type=Path, help="also write the report here as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--quiet", action="store_true", help="no line per fault and per odd job")
    args = ap.parse_args(argv)
    faults = tuple(f for f in args.faults.split(",") if f)
    if unknown := [f for f in faults if f not in FAULTS]:
        ap.error(f"unknown fault kinds {unknown}; known: {', '.join(FAULTS)}")
    opts = Options(
        jobs=args.jobs, parallel=args.parallel, queue=args.queue, fault_rate=args.fault_rate,
        faults=faults, max_minutes=args.max_minutes, seed=args.seed,
        reaper_interval=args.reaper_interval, guest=args.guest,
        boot_timeout=args.boot_timeout, libvirt_timeout=args.libvirt_timeout,
        server_down_seconds=args.server_down_seconds, keep=args.keep, quiet=args.quiet,
    )  # fmt: skip
    report = run(opts)
    print(report.render())
    if args.json:
        fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
        args.json.write_text(json.dumps(fields, indent=1, default=str))
    return report.exit_status()


if __name__ == "__main__":
    raise SystemExit(main())
