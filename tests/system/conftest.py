"""System-test fixtures: a real libvirtd (started by `make test` via scripts/ensure-libvirtd),
real QEMU guests under TCG, the tiny guest built by guests/tiny/build.sh.

Per-test files live under /var/lib/vmbatch/test-jobs (QEMU runs as libvirt-qemu and cannot
reach a mode-0700 home or pytest's tmp_path below it). Every test checks afterwards that it
left no domain and no job directory behind, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import pytest

from tests.system.nfsserver import NfsServer
from tests.system.slurmcluster import SlurmCluster
from tests.system.slurmhooks import vmbatch_cluster
from vmbatch.config import LibvirtConfig
from vmbatch.job import JobUser
from vmbatch.libvirt.connection import Connection

ROOT = Path(__file__).resolve().parents[2]
VMBATCH = ROOT / ".venv" / "bin" / "vmbatch"
TEST_BASE = Path("/var/lib/vmbatch/test-jobs")
#: The job user of the Debian-guest tests (not a user of this host).
ALICE = JobUser("alice", 4242, 4343, "physics", "/home/alice", (("atlas", 5000),))

T = TypeVar("T")


def together(*calls: Callable[[], T]) -> list[T]:
    """Run ``calls`` at the same time, each in its own thread; their results in order.

    For tests whose jobs are independent behaviours on slow guests: a guest under TCG keeps
    about one core busy, so this machine's two cores boot two (or three) in much less than
    the time of one after another. Every call runs to its end (and cleans up) before the
    first failure, if any, is raised.
    """
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def built_guest(name: str) -> Path:
    """The directory of a guest built by guests/NAME/build.sh (make test builds them)."""
    d = Path(os.environ.get("VMBATCH_TEST_GUESTS", "/var/cache/vmbatch/guests")) / name
    if not (d / "disk.qcow2").is_file():
        pytest.fail(f"{name} guest missing in {d}: build it with `make guest-{name}`")
    return d.resolve()


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    return built_guest("tiny")


class SessionConnection(Connection):
    """The tests' shared connection; opened again once libvirtd closed it (a test killed
    and restarted libvirtd: tests/system/test_libvirt_health.py), so later tests work."""

    @property
    def raw(self) -> Any:
        # virConnectIsAlive asks the client library, not libvirtd: it cannot hang.
        if self._conn is None or not self._conn.isAlive():
            self.close()
            self.open()
        return super().raw


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Connection]:
    conn = SessionConnection(LibvirtConfig())
    try:
        conn.open()
    except Exception as exc:  # noqa: BLE001 - turned into a clear failure
        pytest.fail(f"libvirtd not reachable ({exc}); run scripts/ensure-libvirtd")
    yield conn
    conn.close()


@dataclass
class Site:
    """A throw-away vmbatch configuration for one test."""

    root: Path
    config: Path
    job_dir: Path
    console_dir: Path
    base_image: Path

    def write(self, extra: str = "") -> Path:
        text = self.config.read_text()
        self.config.write_text(text + extra)
        return self.config

    def vmbatch(self, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(VMBATCH), "-c", str(self.config), *args],
            capture_output=True,
            timeout=300,
            check=False,
            **kw,  # type: ignore[arg-type]
        )

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(VMBATCH), "-v", "-c", str(self.config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


def register(name: str, guest: Path, disk: str = "disk.qcow2", context: str = "") -> str:
    """The catalog entry for a built guest, from the same script `make config` uses."""
    return subprocess.run(
        [str(ROOT / "scripts" / "register-guest"), name, str(guest), disk, context],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def site_config(guest: Path, job_dir: Path, console_dir: Path, boot_timeout: int = 300) -> str:
    return f"""
[vm]
boot_timeout = {boot_timeout}
# The host's resolver is a private address here: guests must not reach it (network rule).
outbound_network = false
[paths]
job_dir = "{job_dir}"
console_log_dir = "{console_dir}"
cache_dir = "{job_dir.with_name("cache")}"
[checkpoint]
dir = "{job_dir.with_name("checkpoints")}"
# The tests read the hooks' lines from their stderr, whatever this host's syslog does.
[log]
target = "stderr"
{register("demo", guest)}
"""


@pytest.fixture
def site(guest_dir: Path, libvirt_conn: Connection) -> Iterator[Site]:
    TEST_BASE.mkdir(parents=True, exist_ok=True)
    TEST_BASE.chmod(0o755)
    root = TEST_BASE / uuid.uuid4().hex[:8]
    root.mkdir(mode=0o755)
    job_dir, console_dir = root / "jobs", root / "console"
    config = root / "vmbatch.toml"
    config.write_text(site_config(guest_dir, job_dir, console_dir))
    try:
        yield Site(root, config, job_dir, console_dir, guest_dir / "disk.qcow2")
        left = site_domains(libvirt_conn, root)
        assert not left, f"test left domains behind: {left}"
        assert not job_dir.exists() or not any(job_dir.iterdir()), (
            f"test left job files behind: {list(job_dir.iterdir())}"
        )
    finally:
        for name in site_domains(libvirt_conn, root):
            libvirt_conn.destroy(name)
        shutil.rmtree(root, ignore_errors=True)


def site_domains(conn: Connection, root: Path) -> set[str]:
    """vmbatch domains whose disks lie under ``root``: this test's, never another run's."""
    names = set()
    for d in conn.list_vmbatch():
        try:
            xml = conn.raw.lookupByName(d.name).XMLDesc(0)
        except libvirt.libvirtError:
            continue  # gone meanwhile
        if f"{root}/" in xml:
            names.add(d.name)
    return names


@pytest.fixture
def nfs(site: Site) -> Iterator[NfsServer]:
    with NfsServer(site.root / "nfs") as server:
        workdir = server.export / "alice"
        workdir.mkdir()
        os.chown(workdir, ALICE.uid, ALICE.gid)
        yield server


def mount_config(site: Site, server: NfsServer, timeout: int = 120, attempt: int = 30) -> None:
    """A drop-in: outbound traffic on (the gateway), the export at its host path."""
    dropin = site.root / "vmbatch.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "10-nfs.toml").write_text(
        f"""
[vm]
outbound_network = true
[mounts.data]
source = "{server.url}"
path = "{server.export}"
options = "vers=4.2,hard"
timeout = {timeout}
attempt_timeout = {attempt}
"""
    )


@dataclass(frozen=True)
class HostUser:
    """An unprivileged account on this host, made by the test run (batch jobs need one)."""

    name: str
    uid: int
    gid: int
    home: Path


@pytest.fixture(scope="session")
def host_user() -> Iterator[HostUser]:
    """``vmbt<N>`` with a free uid/gid >= 4700 and a home under TEST_BASE; removed after."""
    import grp
    import pwd

    uid = next(u for u in range(4700, 6000) if not _id_used(pwd.getpwuid, u, grp.getgrgid))
    name = f"vmbt{uid}"
    TEST_BASE.mkdir(parents=True, exist_ok=True)
    TEST_BASE.chmod(0o755)
    home = TEST_BASE / f"home-{name}"
    subprocess.run(["groupadd", "-g", str(uid), name], check=True, timeout=30)
    try:
        subprocess.run(
            [
                "useradd",
                "-u",
                str(uid),
                "-g",
                str(uid),
                "-m",
                "-d",
                str(home),
                "-s",
                "/bin/sh",
                name,
            ],
            check=True,
            timeout=30,
        )
        yield HostUser(name, uid, uid, home)
    finally:
        subprocess.run(["userdel", "-r", name], check=False, timeout=30, capture_output=True)
        subprocess.run(["groupdel", name], check=False, timeout=30, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _id_used(getpw: object, n: int, getgr: object) -> bool:
    for get in (getpw, getgr):
        try:
            get(n)  # type: ignore[operator]
            return True
        except KeyError:
            pass
    return False


@dataclass
class BatchSite:
    """A Site with the batch hooks configured; dirs and records checked empty afterwards."""

    site: Site
    user: HostUser
    state_dir: Path
    user_dir: Path
    accounting: Path
    env: dict[str, str]

    @property
    def checkpoints(self) -> Path:
        """``[checkpoint].dir``: each job's checkpoints (:mod:`vmbatch.checkpoint`)."""
        return self.site.root / "checkpoints"

    def records(self) -> list[dict[str, object]]:
        import json

        if not self.accounting.exists():
            return []
        return [json.loads(line) for line in self.accounting.read_text().splitlines()]

    def leftovers(self) -> list[Path]:
        found: list[Path] = []
        for d in (self.state_dir, self.user_dir, self.site.job_dir, self.checkpoints):
            if d.is_dir():
                found += list(d.iterdir())  # lock files included: they go with the record
        notes = self.user_dir / ".paused"  # root's pause notes: one per job, none left after
        if notes.is_dir():
            found += list(notes.iterdir())
        # The node's own state (image failures, vmbatch's drain, libvirtd restarts): no job's;
        # the pause notes' directory and the node agent's socket are the node's too.
        node = (self.state_dir / "node", notes, self.user_dir / ".agent.sock")
        return [p for p in found if p not in node]


@contextlib.contextmanager
def running_agent(site: Site) -> Iterator[Path]:
    """`vmbatch agent` with ``site``'s configuration, as its systemd service runs it,
    stopped by PID afterwards; yields its log."""
    log = site.root / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(VMBATCH), "-v", "-c", str(site.config), "agent", "--interval", "0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while b"agent: watching" not in log.read_bytes():  # its pid file is written by then
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling with a deadline
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()


@pytest.fixture
def agent(batch_site: BatchSite) -> Iterator[Path]:
    """:func:`running_agent` for the batch site."""
    with running_agent(batch_site.site) as log:
        yield log


@pytest.fixture
def batch_site(site: Site, host_user: HostUser) -> Iterator[BatchSite]:
    bs = BatchSite(
        site,
        host_user,
        site.root / "state",
        site.root / "run",
        site.root / "accounting.jsonl",
        {"VMBATCH_CONFIG": str(site.config)},
    )
    site.write(
        f"""
[batch]
default_image = "demo"
state_dir = "{bs.state_dir}"
user_dir = "{bs.user_dir}"
accounting_log = "{bs.accounting}"
"""
    )  # [batch] last: tests append keys to it (test_reaper.py)
    yield bs
    assert not bs.leftovers(), f"batch hooks left files behind: {bs.leftovers()}"


@dataclass(frozen=True)
class NodeGroups:
    """Supplementary groups of the host user, made by the test: ``plain`` must reach the
    guest under its name, ``privileged`` is listed in ``[context].privileged_groups``."""

    plain: str
    privileged: str

    def node_view(self, user: HostUser) -> tuple[str, list[str]]:
        """``id -gn USER`` and ``id -Gn USER`` on the node, as the job's user sees them."""
        gn, all_ = (
            subprocess.run(
                ["id", opt, user.name], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
            for opt in ("-gn", "-Gn")
        )
        return gn, all_.split()


@pytest.fixture
def node_groups(batch_site: BatchSite) -> Iterator[NodeGroups]:
    """Two supplementary groups for the batch site's user (free gids from groupadd), and
    the one named as privileged in the site's config; both removed afterwards."""
    user = batch_site.user.name
    groups = NodeGroups(f"{user}g", f"{user}p")
    made: list[str] = []
    try:
        for name in (groups.plain, groups.privileged):
            subprocess.run(["groupadd", name], check=True, timeout=30, capture_output=True)
            made.append(name)
            subprocess.run(
                ["gpasswd", "-a", user, name], check=True, timeout=30, capture_output=True
            )
        batch_site.site.write(f'\n[context]\nprivileged_groups = ["{groups.privileged}"]\n')
        yield groups
    finally:
        for name in made:
            subprocess.run(["groupdel", name], check=False, timeout=30, capture_output=True)


@pytest.fixture
def libvirtd() -> Iterator[int]:
    """The PID of the running libvirtd (tests may stop or kill it); afterwards libvirtd runs
    and answers, in any case (SIGCONT, else scripts/ensure-libvirtd)."""
    from tests.system import libvirtdctl

    pid = libvirtdctl.pid()
    if not libvirtdctl.is_libvirtd(pid):
        pytest.skip("libvirtd was not started by scripts/ensure-libvirtd (no /run/libvirtd.pid)")
    assert pid is not None
    try:
        yield pid
    finally:
        for each in {pid, libvirtdctl.pid()}:
            if libvirtdctl.is_libvirtd(each):
                os.kill(each, signal.SIGCONT)  # type: ignore[arg-type]
        subprocess.run([str(libvirtdctl.ENSURE), sys.executable], check=True, timeout=300)


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


@dataclass
class SlurmSite:
    bs: BatchSite
    cluster: SlurmCluster

    @property
    def user(self) -> HostUser:
        return self.bs.user

    def srun(
        self, *args: str, input_: bytes | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[bytes]:
        """``srun ARGS`` as the job user from their home, as they would type it."""
        return subprocess.run(
            ["runuser", "-u", self.user.name, "--", "srun", *args],
            input=input_, cwd=self.user.home, env=self.cluster.env(), capture_output=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def submit(self, script: str) -> str:
        return self.cluster.sbatch(script, self.user.name, self.user.home)

    def output(self, job_id: str) -> str:
        return (self.user.home / f"slurm-{job_id}.out").read_text(errors="replace")

    def settled(self, job_id: str, timeout: float = 120) -> dict[str, str]:
        """Wait until the job ended and its Epilog ran (the node is no longer COMPLETING)."""
        job = self.cluster.wait_job(job_id, FINISHED, timeout)
        deadline = time.monotonic() + timeout
        while "COMPLETING" in self.cluster.node()["State"] or self.bs.leftovers():
            assert time.monotonic() < deadline, (self.cluster.node(), self.bs.leftovers())
            time.sleep(0.2)  # polling with a deadline
        return job


@pytest.fixture
def slurm(batch_site: BatchSite) -> Iterator[SlurmSite]:
    with vmbatch_cluster(batch_site.site.root, batch_site.site.config) as cluster:  # started
        yield SlurmSite(batch_site, cluster)
        node = cluster.node()
        assert "DRAIN" not in node["State"], f"node drained: {node.get('Reason')}"
