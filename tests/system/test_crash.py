"""Crash consistency: a hook SIGKILLed at any of its steps leaves only what the epilogue
finishes (issue 14, item 4).

Every fault point in the source (:func:`vmbatch.faults.registry`) gets a case: the hook
that reaches it (Torque's prologue, job starter or epilogue, called as pbs_mom calls them)
runs with that one point armed by a root-owned drop-in, must die of SIGKILL there and leave
what that step had made; then, with the point disarmed, the epilogue (for epilogue points
``vmbatch cleanup JOB_ID``, what an admin runs after a failed Epilog) must remove all of
it. Residue is looked for by this job's id only: domains in libvirt, processes whose
command line names the job's domain or directory, the injection appliance (by the tag the
job directory recorded), the job and user directories, the state record and lock file,
image in-use markers.

Each case boots a guest only if the point lies after the domain exists. A point without an
entry in ``SCENARIOS`` fails ``test_every_fault_point_has_a_scenario``.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.httpserver import Resource, Server, serve
from tests.system.conftest import BatchSite, register
from tests.system.test_torque import Mom
from vmbatch import faults
from vmbatch.config import LibvirtConfig
from vmbatch.contextualize import inject
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name
from vmbatch.process import TAG_VAR
from vmbatch.state import safe_job_id

#: What a step may leave: its kinds, as :meth:`Probe.residue` names them.
LOCK, RECORD, MARKER, JOBDIR, USERDIR = "lock", "record", "marker", "jobdir", "userdir"
CHECKPOINT = "checkpoint"
DOMAIN, PROCESS, APPLIANCE = "domain", "process", "appliance"


@dataclass(frozen=True)
class Scenario:
    """How a point is reached and what must be left when the hook dies there."""

    hook: str  # "prologue", "starter", "epilogue" or "checkpoint" (`vmbatch checkpoint`)
    left: frozenset[str]
    #: The job's image: "cached" (a file:// source copied into the node's cache), "http"
    #: (downloaded from a test server), "inject" (offline injection, libguestfs).
    image: str = "cached"


def _s(hook: str, *left: str, image: str = "cached") -> Scenario:
    return Scenario(hook, frozenset(left), image)


_BOOTING = (LOCK, RECORD, MARKER, JOBDIR, DOMAIN, PROCESS)
SCENARIOS: dict[str, Scenario] = {
    "prologue.locked": _s("prologue", LOCK),
    "prologue.recorded": _s("prologue", LOCK, RECORD),
    "prologue.sized": _s("prologue", LOCK, RECORD),
    "image.marked": _s("prologue", LOCK, RECORD, MARKER),
    "image.copy.chunk": _s("prologue", LOCK, RECORD, MARKER),
    "image.download.chunk": _s("prologue", LOCK, RECORD, MARKER, image="http"),
    "start.image_resolved": _s("prologue", LOCK, RECORD, MARKER),
    "start.jobdir_created": _s("prologue", LOCK, RECORD, MARKER, JOBDIR),
    "disks.overlay_created": _s("prologue", LOCK, RECORD, MARKER, JOBDIR),
    "start.disks_created": _s("prologue", LOCK, RECORD, MARKER, JOBDIR),
    "inject.daemon_started": _s("prologue", LOCK, RECORD, JOBDIR, APPLIANCE, image="inject"),
    "inject.appliance_running": _s(
        "prologue", LOCK, RECORD, JOBDIR, APPLIANCE, PROCESS, image="inject"
    ),
    "start.seed_written": _s("prologue", LOCK, RECORD, MARKER, JOBDIR),
    "start.domain_created": _s("prologue", *_BOOTING),
    "start.port_forwarded": _s("prologue", *_BOOTING),
    "start.ssh_ready": _s("prologue", *_BOOTING),
    "prologue.vm_started": _s("prologue", *_BOOTING),
    "prologue.boot_recorded": _s("prologue", *_BOOTING),
    "prologue.userdir_written": _s("prologue", *_BOOTING, USERDIR),
    "prologue.ready": _s("prologue", *_BOOTING, USERDIR),
    "starter.job_started": _s("starter", *_BOOTING, USERDIR),
    # The VM was saved (so gone), its files copied, no manifest yet.
    "checkpoint.files_written": _s("checkpoint", LOCK, RECORD, MARKER, JOBDIR, USERDIR, CHECKPOINT),
    # The checkpoint complete, the VM restored from it (paused), nothing set on it yet.
    "checkpoint.restored": _s(
        "checkpoint", LOCK, RECORD, MARKER, JOBDIR, USERDIR, CHECKPOINT, DOMAIN, PROCESS
    ),
    "teardown.destroyed": _s("epilogue", LOCK, RECORD, MARKER, JOBDIR, USERDIR),
    "teardown.jobdir_removed": _s("epilogue", LOCK, RECORD, MARKER, USERDIR),
    "finish.userdir_removed": _s("epilogue", LOCK, RECORD, MARKER),
    "finish.accounted": _s("epilogue", LOCK, RECORD, MARKER),
    "finish.image_released": _s("epilogue", LOCK, RECORD),
    "finish.record_removed": _s("epilogue", LOCK),
}


@pytest.fixture
def libvirt_conn() -> Iterator[Connection]:
    """A connection per test, not per session: other tests on this machine kill and restart
    libvirtd, and a session's connection would not survive that."""
    with Connection(LibvirtConfig()) as conn:
        yield conn


def test_every_fault_point_has_a_scenario() -> None:
    """A step added with a fault point but no case here fails, and so does a stale case."""
    assert set(SCENARIOS) == set(faults.registry())


@dataclass
class Probe:
    """Looks for what one job left on this node."""

    bs: BatchSite
    job_id: str
    #: Appliance tags seen in the job directory (kept: the directory goes, the tag must not
    #: be forgotten before its processes are checked).
    tags: set[str] = field(default_factory=set)

    def residue(self) -> dict[str, list[str]]:
        site, safe = self.bs.site, safe_job_id(self.job_id)
        jobdir = site.job_dir / safe
        name = domain_name(self.job_id)
        for tag_file in jobdir.glob(f"{inject.WORK_PREFIX}*/{inject.TAG_FILE}"):
            self.tags.add(tag_file.read_text().strip())
        found: dict[str, list[str]] = {
            LOCK: _names(self.bs.state_dir, f"{safe}.lock"),
            RECORD: _names(self.bs.state_dir, f"{safe}.json", f".{safe}.json.*.tmp"),
            MARKER: _names(site.root / "cache" / "images", f"*.jobs/{safe}"),
            JOBDIR: [str(jobdir)] if jobdir.exists() else [],
            USERDIR: _names(self.bs.user_dir, safe),
            CHECKPOINT: _names(self.bs.checkpoints, safe),
            DOMAIN: _domains(name),
            PROCESS: _processes(lambda cmd, _env: name in cmd or str(jobdir) in cmd),
            APPLIANCE: _processes(
                lambda _cmd, env: any(f"{TAG_VAR}={t}".encode() in env for t in self.tags)
            ),
        }
        return {kind: items for kind, items in found.items() if items}


def _domains(name: str) -> list[str]:
    """Domains called ``name``, running or defined (on a fresh connection: see above)."""
    with Connection(LibvirtConfig()) as conn:
        return [d.name() for d in conn.raw.listAllDomains() if d.name() == name]


def _names(directory: Path, *patterns: str) -> list[str]:
    return sorted(str(p) for pattern in patterns for p in directory.glob(pattern))


def _processes(match: Callable[[str, bytes], bool]) -> list[str]:
    """``pid: cmdline`` of live processes (not this one) for which ``match(cmd, env)``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if cmd and match(cmd, env):
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


@dataclass
class Images:
    """The test's catalog additions and the HTTP server behind the "http" image."""

    server: Server
    body: bytes


@pytest.fixture
def images(batch_site: BatchSite, guest_dir: Path) -> Iterator[Images]:
    """Three more images from the tiny guest: ``cached`` (file://, with a scratch disk so
    that ``disks.overlay_created`` lies between two disks), ``http`` (2 MiB that only
    needs to start downloading) and ``inject``; jobs choose one with ``#VMBATCH image=``."""
    disk = guest_dir / "disk.qcow2"
    body = os.urandom(2 * 1024 * 1024)
    entry = register("demo", guest_dir)
    with serve() as server:
        server.resources["/big.img"] = Resource(body)
        cached = re.sub(
            r'source = ".*"',
            f'source = "file://{disk}"\nsha256 = "{_sha(disk.read_bytes())}"\nscratch_gib = 1',
            entry.replace("[images.demo]", "[images.cached]"),
        )
        http = re.sub(
            r'source = ".*"',
            f'source = "{server.url("/big.img")}"\nsha256 = "{_sha(body)}"',
            entry.replace("[images.demo]", "[images.http]"),
        )
        injected = entry.replace("[images.demo]", "[images.inject]") + 'context = "inject"\n'
        dropins = batch_site.site.root / "vmbatch.d"
        dropins.mkdir(exist_ok=True)
        (dropins / "20-images.toml").write_text(
            f'[batch]\nuser_images = ["cached", "http", "inject"]\n'
            f'[cache]\nimage_dirs = ["{guest_dir}"]\n{cached}\n{http}\n{injected}\n'
        )
        yield Images(server, body)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _arm(bs: BatchSite, point: str | None) -> None:
    """Arm ``point`` (None: disarm) in a root-owned drop-in of the test's configuration."""
    dropin = bs.site.root / "vmbatch.d" / "90-faults.toml"
    if point is None:
        dropin.unlink(missing_ok=True)
    else:
        dropin.write_text(f'[debug]\nfault_points = ["{point}"]\nfault_action = "kill"\n')


def _killed_at(point: str, returncode: int, stderr: bytes) -> None:
    assert returncode == -signal.SIGKILL, stderr.decode()
    assert f"fault injection: SIGKILL at {point} " in stderr.decode(), stderr.decode()


def _job(bs: BatchSite, image: str) -> Mom:
    return Mom(bs, f"#!/bin/sh\n#VMBATCH image={image}\necho started\nsleep 60\n")


@pytest.mark.parametrize("point", list(faults.registry()))
def test_sigkill_at_each_step_leaves_only_what_the_epilogue_removes(
    batch_site: BatchSite, images: Images, point: str
) -> None:
    scenario = SCENARIOS.get(point)
    if scenario is None:
        pytest.fail(f"fault point {point} has no scenario in SCENARIOS: add one")
    mom = _job(batch_site, scenario.image)
    probe = Probe(batch_site, mom.job_id)
    try:
        if scenario.hook != "prologue":
            pro = mom.prologue()
            assert pro.returncode == 0, pro.stderr.decode()
        _arm(batch_site, point)
        if scenario.hook == "prologue":
            done = mom.prologue()
            _killed_at(point, done.returncode, done.stderr)
        elif scenario.hook == "checkpoint":
            done = batch_site.site.vmbatch("checkpoint", mom.job_id)
            _killed_at(point, done.returncode, done.stderr)
        elif scenario.hook == "starter":
            proc = mom.starter()
            _, err = proc.communicate(timeout=300)
            _killed_at(point, proc.returncode, err)
        else:
            done = mom.epilogue(0)
            _killed_at(point, done.returncode, done.stderr)
        left = probe.residue()
        assert scenario.left <= set(left), f"expected {sorted(scenario.left)} left: {left}"
        if point == "image.download.chunk":
            part = next((batch_site.site.root / "cache" / "images").glob(".http-*.img.part"))
            assert part.stat().st_size < len(images.body)  # really killed mid-download
        _arm(batch_site, None)
        if scenario.hook == "epilogue":  # what an admin runs after the Epilog failed
            done = batch_site.site.vmbatch("cleanup", mom.job_id)
        else:
            done = mom.epilogue(0)
        assert done.returncode == 0, done.stderr.decode()
        assert probe.residue() == {}
    finally:
        _arm(batch_site, None)
        if probe.residue():
            mom.epilogue(0)  # leave nothing to the next test, even after a failure


@pytest.mark.parametrize("point", ["start.domain_created", "prologue.userdir_written"])
def test_a_killed_prologue_run_again_boots_the_job(
    batch_site: BatchSite, images: Images, point: str
) -> None:
    """Restartable: the scheduler's next prologue for the job (a requeue to this node)
    finishes what the killed one left, then the job runs and ends with nothing left."""
    mom = Mom(batch_site, "#!/bin/sh\n#VMBATCH image=cached\necho again\nexit 3\n")
    probe = Probe(batch_site, mom.job_id)
    try:
        _arm(batch_site, point)
        killed = mom.prologue()
        _killed_at(point, killed.returncode, killed.stderr)
        _arm(batch_site, None)
        pro = mom.prologue()
        assert pro.returncode == 0, pro.stderr.decode()
        assert b"state of an earlier prologue" in pro.stderr
        proc = mom.starter()
        out, err = proc.communicate(timeout=300)
        assert (proc.returncode, out) == (3, b"again\n"), err.decode()
        assert mom.epilogue(3).returncode == 0
        assert probe.residue() == {}
    finally:
        _arm(batch_site, None)
        if probe.residue():
            mom.epilogue(0)


def test_partial_download_of_a_killed_prologue_is_resumed(
    batch_site: BatchSite, images: Images
) -> None:
    """The partial file a killed download leaves is not residue: the next fetch resumes it
    (a Range request for the rest) rather than starting over."""
    mom = _job(batch_site, "http")
    _arm(batch_site, "image.download.chunk")
    killed = mom.prologue()
    _killed_at("image.download.chunk", killed.returncode, killed.stderr)
    _arm(batch_site, None)
    assert mom.epilogue(0).returncode == 0
    cache = batch_site.site.root / "cache" / "images"
    (part,) = cache.glob(".http-*.img.part")
    have = part.stat().st_size
    assert 0 < have < len(images.body)
    pulled = batch_site.site.vmbatch("image", "pull", "http")
    assert pulled.returncode == 0, pulled.stderr.decode()
    hits = images.server.wait_idle()
    assert hits[-1].range == f"bytes={have}-" and hits[-1].status == 206
    (image,) = cache.glob("http-*.img")
    assert image.read_bytes() == images.body
