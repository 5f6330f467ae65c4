"""Offline injection's refusals with the real libguestfs (one appliance boot per case).

The successful path boots a guest: tests/system/test_debian_guest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmbatch import config, lifecycle
from vmbatch.contextualize import ContextSpec, get_method
from vmbatch.contextualize.keys import generate
from vmbatch.errors import Disposition, ImageError, InjectionToolError
from vmbatch.images.catalog import resolve
from vmbatch.images.disks import create_overlay
from vmbatch.job import JobUser
from vmbatch.state import JobDir

SPEC = ContextSpec(
    instance_id="vmbatch-t",
    hostname="vmbatch-t",
    user=JobUser("alice", 4242, 4343, "physics", "/home/alice"),
    authorized_keys=(generate("client").public_openssh,),
    host_key=generate("host"),
)

ROOT = Path(__file__).resolve().parents[2]
#: The prologue's injection, run in a child process that a test SIGKILLs.
INJECTION = """
import sys
from pathlib import Path
from tests.integration.test_inject import SPEC, _cfg
from vmbatch.contextualize import get_method
from vmbatch.state import JobDir

cfg = _cfg(Path(sys.argv[1]), Path(sys.argv[2]))
get_method("inject", cfg).prepare(SPEC, JobDir(cfg.paths.job_dir, "t"))
"""


def _cfg(tmp_path: Path, base: Path, **tools: str) -> config.Config:
    (tmp_path / "cache").mkdir(exist_ok=True)
    return config.parse(
        {
            "paths": {"job_dir": str(tmp_path / "jobs"), "cache_dir": str(tmp_path / "cache")},
            "tools": tools,
            "images": {"x": {"source": str(base), "format": "raw"}},
        }
    )


def _ext4_without_os(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    (tree / "data" / "README").write_text("not an operating system\n")
    base = tmp_path / "data.raw"
    with base.open("wb") as fh:
        fh.truncate(64 * 2**20)
    subprocess.run(
        ["/sbin/mkfs.ext4", "-q", "-F", "-d", str(tree), str(base)], check=True, timeout=60
    )
    return base


def _stat(pid: int) -> list[str]:
    """proc(5) /proc/PID/stat from field 3 (state) on; [] if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rindex(")") + 2 :].split()


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _live(pid: int) -> bool:
    """Running: not gone, not a zombie (dead, waiting for its parent or init to reap it)."""
    return _stat(pid)[:1] not in ([], ["Z"])


def _running_on(disk: Path) -> list[int]:
    """Live processes (zombies are dead) naming ``disk``: guestfish's and the appliance's.

    Not "every guestfish": other tests on this machine may run their own meanwhile.
    """
    return [p for p in _pids() if str(disk) in " ".join(_argv(p)) and _live(p)]


def test_image_without_linux_system_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    base = _ext4_without_os(tmp_path)
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    cfg = _cfg(tmp_path, base)
    jobdir = JobDir(cfg.paths.job_dir, "t").create()
    create_overlay(cfg, resolve(cfg, "x"), jobdir.overlay)
    with pytest.raises(ImageError, match=r"no Linux root filesystem.*/dev/sda: ext4") as info:
        get_method("inject", cfg).prepare(SPEC, jobdir)
    assert info.value.disposition is Disposition.ABORT_JOB
    assert "nocloud" in str(info.value)  # the fix is named
    assert sorted(p.name for p in jobdir.path.iterdir()) == ["keys", "overlay.qcow2"]
    assert _running_on(jobdir.overlay) == []  # the appliance was stopped
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before


def test_missing_libguestfs_is_a_node_problem(tmp_path: Path) -> None:
    base = _ext4_without_os(tmp_path)
    cfg = _cfg(tmp_path, base, guestfish=str(tmp_path / "no-guestfish"))
    jobdir = JobDir(cfg.paths.job_dir, "t").create()
    with pytest.raises(InjectionToolError, match="install libguestfs-tools") as info:
        get_method("inject", cfg).prepare(SPEC, jobdir)
    assert info.value.disposition is Disposition.OFFLINE_NODE


def _appliance_qemu(overlay: Path) -> int | None:
    """The PID of the QEMU that runs the appliance with ``overlay`` attached, if any."""
    for pid in _pids():
        argv = _argv(pid)
        if argv and "qemu-system" in argv[0] and f"file={overlay}," in " ".join(argv):
            return pid
    return None


def _in_session(sid: int) -> list[int]:
    """Live processes of session ``sid``."""
    return [p for p in _pids() if _stat(p)[3:4] == [str(sid)] and _live(p)]


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def _tmp_litter(qemu: int, members: list[int]) -> list[Path]:
    """The /tmp entries a killed appliance leaves: guestfish's --listen socket and
    libguestfs's socket directory (its other temporary directory cannot be told apart)."""
    sockets = Path(f"/tmp/.guestfish-{os.geteuid()}")
    found = [sockets / f"socket-{m}" for m in members if "--listen" in _argv(m)]
    for arg in _argv(qemu):
        if m := re.fullmatch(r"socket,path=(/tmp/libguestfs\w{6})/guestfsd\.sock,.*", arg):
            found.append(Path(m.group(1)))
    return found


def _kill_if_in_session(pid: int, sid: int) -> None:
    """SIGKILL ``pid`` if it still is a process of session ``sid`` (PIDs get reused)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if _stat(pid)[3:4] == [str(sid)]:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def test_teardown_stops_the_appliance_of_a_sigkilled_injection(tmp_path: Path) -> None:
    """A prologue SIGKILLed while guestfish boots its appliance (Slurm PrologEpilogTimeout,
    Torque prologalarm) leaves the daemon and QEMU running as root; teardown kills them."""
    base = _ext4_without_os(tmp_path)
    cfg = _cfg(tmp_path, base)
    jobdir = JobDir(cfg.paths.job_dir, "t").create()
    create_overlay(cfg, resolve(cfg, "x"), jobdir.overlay)
    child = subprocess.Popen([sys.executable, "-c", INJECTION, str(tmp_path), str(base)], cwd=ROOT)
    recorded: dict[int, int] = {}  # PID -> pidfd, so a reused PID is never mistaken or killed
    sid: int | None = None
    litter: list[Path] = []  # what the killed guestfish leaves in /tmp (see the finally)
    try:
        deadline = time.monotonic() + 180  # building the appliance, then starting QEMU
        while (qemu := _appliance_qemu(jobdir.overlay)) is None:
            assert child.poll() is None, "the injection ended before its appliance ran"
            assert time.monotonic() < deadline, "the appliance's QEMU never started"
            time.sleep(0.05)
        sid = int(_stat(qemu)[3])
        # The appliance: guestfish's daemon, its children (QEMU, libguestfs's recovery
        # process), all in the session of `guestfish --listen`; and the `guestfish --remote`
        # client the injection was waiting on.
        members = _in_session(sid)
        remote = {f"--remote={m}" for m in members}
        clients = [p for p in _pids() if set(_argv(p)[1:2]) & remote]
        litter += _tmp_litter(qemu, members)
        for pid in {qemu, *members, *clients}:
            with contextlib.suppress(ProcessLookupError):
                recorded[pid] = os.pidfd_open(pid)
        assert len(members) >= 2 and clients  # the daemon and QEMU at least; the client

        os.kill(child.pid, signal.SIGKILL)  # the batch system's prologue timeout
        child.wait(timeout=30)
        assert not _exited(recorded[qemu])  # the finding: the appliance outlives its starter

        lifecycle.teardown(cfg, None, "vmbatch-t", jobdir)

        left = {pid: _argv(pid)[:1] for pid, fd in recorded.items() if not _exited(fd)}
        assert not left, f"teardown left the appliance running: {left}"
        assert _in_session(sid) == []  # nor anything the daemon started after we looked
        assert not jobdir.path.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for fd in recorded.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        if sid is not None:
            for pid in _in_session(sid):
                _kill_if_in_session(pid, sid)
        for fd in recorded.values():
            os.close(fd)
        for path in litter:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
