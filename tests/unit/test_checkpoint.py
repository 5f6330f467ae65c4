"""Checkpoints (:mod:`vmbatch.checkpoint`) and ``vmbatch checkpoint`` through click's test
runner, against libvirt's test driver. The test driver cannot restore a save paused
(``testDomainRestoreFlags`` refuses ``VIR_DOMAIN_SAVE_PAUSED``) nor forward a port, so
save, restore and the forward are stand-ins that record their calls; real VMs:
tests/system/test_checkpoint.py."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_ops import Site, domain_xml
from vmbatch import __version__, checkpoint, config
from vmbatch.errors import CheckpointRefusedError, LibvirtError, LibvirtUnavailableError
from vmbatch.hooks import batch
from vmbatch.hooks.accounting import JobEnd
from vmbatch.hooks.jobstate import READY, StateStore, UserDir
from vmbatch.hooks.request import Resources
from vmbatch.job import JobSpec, JobUser
from vmbatch.libvirt import connection
from vmbatch.libvirt.domain import domain_name, restore_xml
from vmbatch.state import JobDir

JOB = "4242"


class Libvirt:
    """What the stand-ins were asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        #: The XML each restore was given.
        self.restored: list[str] = []
        #: QEMU's loopback forwards (host port, guest port).
        self.forwards: list[tuple[int, int]] = []


#: The save file's XML: the running domain's, pinned to CPUs 5-6 of the run it was saved
#: in, with its memory limit (a live setting that the save keeps).
SAVED = (
    domain_xml(JOB, "alice", Path("/j"))
    .replace("<vcpu>2</vcpu>", "<vcpu placement='static' cpuset='5-6'>2</vcpu>", 1)
    .replace("</memory>", "</memory><memtune><hard_limit unit='KiB'>1</hard_limit></memtune>", 1)
)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path, [domain_xml(JOB, "alice", tmp_path / "jobs")])
    s.config.write_text(s.config.read_text() + f'[checkpoint]\ndir = "{tmp_path / "ckpt"}"\n')
    jobdir = JobDir(s.job_dir, JOB)
    jobdir.path.mkdir(parents=True)
    jobdir.keys.mkdir()
    jobdir.overlay.write_bytes(b"overlay" * 1000)
    (jobdir.keys / "login.json").write_text('{"port": 1111, "user": "alice"}\n')
    s.record(JOB, domain=domain_name(JOB), phase=READY, jobdir=str(jobdir.path),
             memory_limit_mib=600, cpus="1", uid=4711)  # fmt: skip
    return s


@pytest.fixture
def lv(monkeypatch: pytest.MonkeyPatch) -> Libvirt:
    seen = Libvirt()

    def save(self: Any, name: str, path: Path, *, timeout: float) -> None:
        seen.calls.append(("save", name))
        path.write_bytes(b"memory of " + name.encode())

    def restore(self: Any, path: Path, xml: str, *, timeout: float) -> None:
        seen.calls.append(("restore", path.name))
        seen.restored.append(xml)

    def forward(self: Any, name: str, port: int) -> int:
        seen.calls.append(("forward", name))
        seen.forwards.append((2222, port))
        return 2222

    monkeypatch.setattr(connection.Connection, "save", save)
    monkeypatch.setattr(connection.Connection, "restore", restore)
    monkeypatch.setattr(connection.Connection, "saved_xml", lambda self, path: SAVED)
    monkeypatch.setattr(connection.Connection, "forward_port", forward)
    monkeypatch.setattr(connection.Connection, "forwards", lambda self, name: seen.forwards)
    monkeypatch.setattr(
        connection.Connection, "limit_memory",
        lambda self, name, mib: seen.calls.append(("limit", mib)),
    )  # fmt: skip
    return seen


def _cfg(site: Site) -> config.Config:
    return config.load(site.config, honour_env=False)


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)) for p in root.rglob("*")}


def test_checkpoint_continue_writes_a_verified_generation_and_runs_the_vm_on(
    site: Site, lv: Libvirt
) -> None:
    code, out, err = site.vmbatch("checkpoint", JOB)
    assert code == 0, err
    assert f"checkpoint 1 of job {JOB} in " in out and "runs on, SSH on port 2222" in out
    assert lv.calls == [("save", domain_name(JOB)), ("restore", "memory.save"),
                        ("limit", 600), ("forward", domain_name(JOB))]  # fmt: skip
    # Restored on the job's CPUs (its record's), without the saved memory limit.
    (restored,) = lv.restored
    assert read_pinning(restored) == "1" and "memtune" not in restored
    base = site.root / "ckpt" / JOB
    gen = base / "1"
    assert sorted(str(p.relative_to(gen)) for p in gen.rglob("*")) == [
        "disks", "disks/overlay.qcow2", "keys", "keys/login.json", "manifest.json",
        "memory.save",
    ]  # fmt: skip
    assert _modes(site.root / "ckpt") == {("d", 0o700), ("f", 0o600)}
    manifest = json.loads((gen / "manifest.json").read_bytes())
    assert manifest["job_id"] == JOB and manifest["generation"] == 1
    assert manifest["vmbatch_version"] == __version__ and manifest["then"] == "continue"
    assert manifest["files"]["disks/overlay.qcow2"]["size"] == 7000
    assert (gen / "disks" / "overlay.qcow2").read_bytes() == b"overlay" * 1000
    # The starter finds the new port in root's note; root's own login has it too.
    note = UserDir(site.user_dir, JOB).read_note()
    assert (note.paused, note.port, note.stopped) == (False, 2222, False)
    login = json.loads(JobDir(site.job_dir, JOB).login.read_bytes())
    assert login["port"] == 2222
    rec = StateStore(site.state_dir).read(JOB)
    assert rec is not None and rec.pauses == ()
    assert not checkpoint.requeued(_cfg(site), JOB)
    # The next one replaces it, and the older generation goes only then.
    code, out, err = site.vmbatch("checkpoint", "--continue", JOB)
    assert code == 0 and "checkpoint 2 of job" in out, err
    assert sorted(p.name for p in base.iterdir()) == ["2"]


def test_checkpoint_stop_leaves_the_vm_gone_and_marks_the_job_for_its_requeue(
    site: Site, lv: Libvirt
) -> None:
    code, out, err = site.vmbatch("checkpoint", "--stop", JOB)
    assert code == 0, err
    assert "the VM is stopped: the job's next run continues from it" in out
    assert [c[0] for c in lv.calls] == ["save"]
    note = UserDir(site.user_dir, JOB).read_note()
    assert note.paused and note.stopped
    cfg = _cfg(site)
    assert checkpoint.requeued(cfg, JOB)
    assert not checkpoint.discard(cfg, JOB)  # the epilogue keeps it for the next run
    checkpoint.clear_requeue(cfg, JOB)
    assert checkpoint.discard(cfg, JOB) and not (site.root / "ckpt" / JOB).exists()


@pytest.mark.parametrize(
    ("prolog_saw", "end", "kept"),
    [
        (0, JobEnd(0, 15, restarts=1), True),  # scontrol requeue, preemption
        (2, JobEnd(0, 15, restarts=3), True),
        (1, JobEnd(3, 0, restarts=1), False),  # the job ended for good
        (1, JobEnd(199, 0, restarts=1), True),  # RequeueExit: counted after the Epilog
        (1, JobEnd(200, 0, restarts=1), True),  # RequeueExitHold: runs once released
        (0, JobEnd(0, 15), True),  # slurmctld not asked: kept, the reaper decides later
        (None, JobEnd(0, 15, restarts=3), False),  # Torque: no count; the mark decides
    ],
)
def test_the_epilog_keeps_the_checkpoints_of_a_job_that_runs_again(
    site: Site, lv: Libvirt, prolog_saw: int | None, end: JobEnd, kept: bool
) -> None:
    """A SIGUSR2 checkpoint (``--continue``), then the job's run ends: kept (and marked)
    for the next run if the job runs again, else removed."""
    code, _, err = site.vmbatch("checkpoint", JOB)
    assert code == 0, err
    store = StateStore(site.state_dir)
    rec = store.read(JOB)
    assert rec is not None
    store.write(dataclasses.replace(rec, restarts=prolog_saw))
    asked: list[str] = []

    def ask() -> JobEnd:
        asked.append(JOB)
        return end

    cfg = _cfg(site)
    batch.finish(cfg, JOB, end=ask, account=True)
    assert (site.root / "ckpt" / JOB / "1").is_dir() == kept
    assert checkpoint.requeued(cfg, JOB) == kept  # the next prologue restores it
    assert len(asked) == 1  # slurmctld asked once, for the accounting and the requeue both
    assert store.read(JOB) is None
    assert [p.name for p in (site.root / "ckpt").iterdir()] == ([JOB] if kept else [])


def test_the_reaper_keeps_checkpoints_and_cleanup_of_a_job_drops_them(
    site: Site, lv: Libvirt
) -> None:
    code, _, err = site.vmbatch("checkpoint", JOB)
    assert code == 0, err
    cfg = _cfg(site)
    rec = StateStore(site.state_dir).read(JOB)
    batch.finish(cfg, JOB, rec, checkpoints="keep", if_unchanged=True)
    assert (site.root / "ckpt" / JOB / "1").is_dir()  # a job may be requeued: not its call
    assert checkpoint.requeued(cfg, JOB)  # marked: the reaper's own pass decides
    code, _, err = site.vmbatch("cleanup", JOB)
    assert code == 0, err
    assert not (site.root / "ckpt" / JOB).exists()


def test_a_checkpoint_that_fails_after_the_save_runs_the_vm_on_from_it(
    site: Site, lv: Libvirt, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(src: Path, dst: Path, mode: int = 0o600) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "copy_file", full)
    code, _, err = site.vmbatch("checkpoint", "--stop", JOB)
    assert code == 75 and "No space left on device" in err
    assert [c[0] for c in lv.calls] == ["save", "restore", "limit", "forward"]
    base = site.root / "ckpt" / JOB
    assert list(base.iterdir()) == []  # no partial checkpoint, no requeue mark
    rec = StateStore(site.state_dir).read(JOB)
    assert rec is not None and rec.pauses == ()


def test_a_vm_that_cannot_run_on_from_a_complete_checkpoint_is_left_to_the_requeue(
    site: Site, lv: Libvirt, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Any, path: Path, xml: str, *, timeout: float) -> None:
        raise LibvirtError("libvirt could not restore a saved domain: no")

    monkeypatch.setattr(connection.Connection, "restore", refuse)
    code, _, err = site.vmbatch("checkpoint", JOB)
    assert code == 75, err
    assert "checkpoint 1 of job 4242 is complete, but its VM could not run on from it" in err
    cfg = _cfg(site)
    assert checkpoint.requeued(cfg, JOB)
    assert UserDir(site.user_dir, JOB).read_note().stopped  # its starter exits for a requeue
    found = checkpoint.newest_valid(cfg, JOB, qemu_version=_qemu(site))
    assert found.checkpoint is not None and found.checkpoint.generation == 1


def _qemu(site: Site) -> str:
    return str(
        json.loads((site.root / "ckpt" / JOB / "1" / "manifest.json").read_bytes())["qemu_version"]
    )


def test_checkpoint_refuses_what_is_not_a_running_batch_job(site: Site) -> None:
    code, _, err = site.vmbatch("checkpoint", "4711")
    assert code == 65 and "no batch job 4711 on this node" in err
    site.record("4712", domain=domain_name("4712"), phase="failed")
    code, _, err = site.vmbatch("checkpoint", "--stop", "4712")
    assert code == 65 and "job 4712 is failed, not running" in err
    code, _, err = site.vmbatch("checkpoint", "../x")
    assert code == 65 and "has characters vmbatch does not accept" in err


def test_checkpoint_is_roots(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4711)
    code, _, err = site.vmbatch("checkpoint", JOB)
    assert code == 65 and "only root may checkpoint a job's VM" in err


def test_checkpoint_has_a_help_and_needs_a_job(site: Site) -> None:
    code, out, _ = site.vmbatch("checkpoint", "--help")
    assert code == 0 and "Example:" in out and "Exit status" in out
    code, _, err = site.vmbatch("checkpoint")
    assert code == 2 and "Missing argument 'JOB'" in err


# -- verifying -----------------------------------------------------------------------------


@pytest.fixture
def taken(site: Site, lv: Libvirt) -> Path:
    code, _, err = site.vmbatch("checkpoint", "--stop", JOB)
    assert code == 0, err
    return site.root / "ckpt" / JOB


def _newest(site: Site, qemu: str = "2.0.0") -> checkpoint.Found:
    return checkpoint.newest_valid(_cfg(site), JOB, qemu_version=qemu)


def test_the_newest_complete_checkpoint_is_found_and_unfinished_ones_are_removed(
    site: Site, taken: Path
) -> None:
    manifest = json.loads((taken / "1" / "manifest.json").read_bytes())
    (taken / ".tmp-2-999").mkdir()
    (taken / ".tmp-2-999" / "memory.save").write_bytes(b"half")
    found = _newest(site, manifest["qemu_version"])
    assert found.checkpoint is not None and found.checkpoint.generation == 1
    assert [(r.path.name, r.reason) for r in found.refused] == [
        (".tmp-2-999", "unfinished (its writer was stopped); removed")
    ]
    assert not (taken / ".tmp-2-999").exists()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda g: (g / "disks" / "overlay.qcow2").write_bytes(b"overlaX" * 1000),
         "disks/overlay.qcow2 was modified after the checkpoint was taken (its sha256 differs)"),
        (lambda g: (g / "disks" / "overlay.qcow2").write_bytes(b"more" * 2000),
         "disks/overlay.qcow2 was modified after the checkpoint was taken (size 8000,"
         " manifest 7000)"),
        (lambda g: (g / "memory.save").unlink(), "memory.save is missing"),
        (lambda g: (g / "manifest.json").unlink(), "no manifest: the checkpoint was not finished"),
        (lambda g: (g / "manifest.json").write_text("{"), "its manifest is unreadable"),
    ],
)  # fmt: skip
def test_a_damaged_checkpoint_is_refused_with_its_reason(
    site: Site, taken: Path, damage: Any, reason: str
) -> None:
    qemu = json.loads((taken / "1" / "manifest.json").read_bytes())["qemu_version"]
    damage(taken / "1")
    found = _newest(site, qemu)
    assert found.checkpoint is None
    assert len(found.refused) == 1 and found.refused[0].reason.startswith(reason)


def test_a_checkpoint_from_another_qemu_vmbatch_or_base_image_is_refused(
    site: Site, taken: Path
) -> None:
    path = taken / "1" / "manifest.json"
    manifest = json.loads(path.read_bytes())
    found = _newest(site, "7.2.99")
    assert found.checkpoint is None
    assert found.refused[0].reason == (
        f"taken with QEMU {manifest['qemu_version']}, this node has QEMU 7.2.99: a saved VM"
        " restores only into the same QEMU"
    )
    path.write_text(json.dumps({**manifest, "vmbatch_version": "0.0.1"}))
    assert _newest(site, manifest["qemu_version"]).refused[0].reason == (
        f"taken by vmbatch 0.0.1, this node runs vmbatch {__version__}"
    )
    image = site.root / "base.qcow2"
    image.write_bytes(b"base")
    base = {"path": str(image), "sha256": checkpoint.sha256(image)}
    path.write_text(json.dumps({**manifest, "base_image": base}))
    assert _newest(site, manifest["qemu_version"]).checkpoint is not None
    image.write_bytes(b"BASE")
    assert _newest(site, manifest["qemu_version"]).refused[0].reason == (
        f"its base image {image} changed since the checkpoint was taken (sha256 differs)"
    )
    image.unlink()
    assert _newest(site, manifest["qemu_version"]).refused[0].reason == (
        f"its base image {image} is gone"
    )


def test_no_checkpoint_directory_means_nothing_to_restore(site: Site) -> None:
    assert checkpoint.newest_valid(_cfg(site), JOB) == checkpoint.Found(None)


# -- files, notes, XML ---------------------------------------------------------------------


def test_copy_file_keeps_holes_and_creates_the_copy_root_only(tmp_path: Path) -> None:
    src = tmp_path / "sparse"
    with src.open("wb") as fh:
        fh.write(b"head")
        fh.seek(64 << 20)
        fh.write(b"tail")
    os.umask(0o022)
    checkpoint.copy_file(src, tmp_path / "copy")
    copy = tmp_path / "copy"
    assert copy.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert copy.stat().st_blocks * 512 < 1 << 20  # the 64 MiB hole stays a hole
    with pytest.raises(FileExistsError):
        checkpoint.copy_file(src, copy)


def test_the_pause_note_keeps_the_port_across_pauses(tmp_path: Path) -> None:
    userdir = UserDir(tmp_path, JOB)
    userdir.write_paused(True, 1, port=3333)
    userdir.write_paused(False, 1)  # pausing.drop rewrites it: the port stays
    assert userdir.read_note() == type(userdir.read_note())(False, 1, 3333, False)
    assert userdir.read_paused() == (False, 1)
    userdir.write_paused(True, 2, stopped=True)
    note = userdir.read_note()
    assert (note.paused, note.port, note.stopped) == (True, 3333, True)
    assert stat.S_IMODE(userdir.paused_note.stat().st_mode) == 0o644


def test_the_starter_logs_in_on_the_port_of_the_note_and_trusts_a_paused_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmbatch.contextualize.keys import KeyPair
    from vmbatch.guest import ssh

    userdir = UserDir(tmp_path, JOB)
    endpoint = ssh.Endpoint(port=1111, user="alice", client_key=KeyPair("", ""),
                            host_key=KeyPair("", ""))  # fmt: skip
    asked: list[int] = []
    monkeypatch.setattr(batch, "_port_open", lambda host, port: asked.append(port) or False)
    assert batch._current(endpoint, userdir) == endpoint
    assert not batch._vm_alive(endpoint, userdir) and asked == [1111]
    userdir.write_paused(True, 1)
    assert batch._vm_alive(endpoint, userdir) and asked == [1111]  # paused: not asked
    userdir.write_paused(False, 1, port=2222)
    assert batch._current(endpoint, userdir).port == 2222
    assert not batch._vm_alive(endpoint, userdir) and asked == [1111, 2222]
    userdir.write_paused(True, 1, stopped=True)
    assert not batch._vm_alive(endpoint, userdir)


def test_restore_xml_drops_the_memory_limit_and_keeps_the_rest() -> None:
    out = restore_xml(SAVED, cpus={5, 6})
    assert "memtune" not in out and "hard_limit" not in out
    assert "vmbatch:job" in out and "qemu:commandline" in out
    assert restore_xml(out, cpus={5, 6}) == out


def read_pinning(xml: str) -> str | None:
    vcpu = ET.fromstring(xml).find("vcpu")
    assert vcpu is not None
    return vcpu.get("cpuset")


# -- the prologue's side ---------------------------------------------------------------------


def _bad_checkpoint(site: Site) -> config.Config:
    """A job whose only checkpoint lacks its manifest (and an unfinished one beside)."""
    base = site.root / "ckpt" / JOB
    (base / "3").mkdir(parents=True)
    (base / ".tmp-4-77").mkdir()
    cfg = _cfg(site)
    checkpoint.mark_requeue(cfg, JOB)  # its previous run said it runs again
    return cfg


def test_a_refused_checkpoint_holds_the_job_and_is_kept_for_the_admin(site: Site) -> None:
    (site.root / "vmbatch.d").mkdir()
    (site.root / "vmbatch.d" / "50-hold.toml").write_text('[checkpoint]\non_bad = "hold"\n')
    cfg = _bad_checkpoint(site)
    spec = JobSpec(job_id=JOB, user="alice", image="demo", argv=(), scheduler="slurm")
    with pytest.raises(CheckpointRefusedError) as caught:
        batch._restored(cfg, spec, None)
    assert "checkpoint 3: no manifest: the checkpoint was not finished" in str(caught.value)
    assert ".tmp-4-77" not in str(caught.value)  # an unfinished take is no reason to hold
    assert checkpoint.requeued(cfg, JOB)  # its epilogue keeps the checkpoints
    assert not checkpoint.discard(cfg, JOB)
    # The starter holds the job ([batch].hold_exit) with the reason in its output.
    userdir = UserDir(cfg.batch.user_dir, JOB)
    bj = batch.BatchJob("slurm", JOB, "alice", Resources())
    uid = os.getuid() or 4711  # root hands the directory to the job's user
    identity = JobUser("alice", uid, uid, "alice", "/home/alice")
    batch._tell_starter(cfg, bj, userdir, identity, caught.value)
    assert userdir.read(UserDir.STATUS) == b"200\n"
    assert b"the job is held" in (userdir.read(UserDir.ERROR) or b"")
    # An admin's `vmbatch cleanup JOB` removes them all the same.
    code, _, err = site.vmbatch("cleanup", JOB)
    assert code == 0, err
    assert not (site.root / "ckpt" / JOB).exists()


def test_a_refused_checkpoint_starts_the_job_afresh_by_default(site: Site) -> None:
    cfg = _bad_checkpoint(site)
    checkpoint.mark_requeue(cfg, JOB)
    spec = JobSpec(job_id=JOB, user="alice", image="demo", argv=())
    assert batch._restored(cfg, spec, None) is None
    assert not checkpoint.requeued(cfg, JOB)  # its end removes them
    assert sorted(p.name for p in (site.root / "ckpt" / JOB).iterdir()) == ["3"]


def _spec(**kw: Any) -> JobSpec:
    """This run of the job, as ``job_spec`` sizes it from its allocation here."""
    alice = JobUser("alice", 4711, 4711, "alice", "/home/alice")
    base: dict[str, Any] = {"job_id": JOB, "user": "alice", "image": "demo", "argv": (),
                            "vcpus": 2, "memory": 512, "identity": alice}  # fmt: skip
    return JobSpec(**{**base, **kw})


@pytest.fixture
def requeued(site: Site, lv: Libvirt, monkeypatch: pytest.MonkeyPatch) -> config.Config:
    """The job checkpointed with --stop (a VM of 2 vCPUs and 512 MiB pinned to CPUs 5-6,
    its record's limit 600 MiB), its epilogue run: its next run may restore it."""
    jobdir = JobDir(site.job_dir, JOB)
    info = {"port": 1111, "user": "alice", "host_key": "ssh-ed25519 AAAA host"}
    jobdir.login.write_text(json.dumps(info))
    jobdir.user_key.write_text("PRIVATE KEY")
    code, _, err = site.vmbatch("checkpoint", "--stop", JOB)
    assert code == 0, err
    shutil.rmtree(jobdir.path)  # the epilogue's teardown
    lv.calls.clear()
    monkeypatch.setattr(
        batch, "resolve", lambda cfg, name, **kw: type("Image", (), {
            "path": Path("/base.qcow2"), "cached": False, "name": name})(),
    )  # fmt: skip
    return _cfg(site)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (_spec(vcpus=1), "1 vCPU and 512 MiB"),
        (_spec(memory=511), "2 vCPUs and 511 MiB"),
    ],
)
def test_a_saved_vm_larger_than_the_jobs_allocation_now_is_refused(
    requeued: config.Config, lv: Libvirt, spec: JobSpec, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A requeued job may get fewer CPUs or less memory than the run that took its
    checkpoint; the restored VM keeps its size, so it is refused, naming both sizes."""
    reason = (
        "checkpoint 1: its VM has 2 vCPUs and 512 MiB of memory, more than this run of the"
        f" job is given: {why} (from its allocation here)"
    )
    assert batch._restored(requeued, spec, None) is None  # on_bad = "fresh": boots afresh
    assert reason in caplog.text and "starts afresh" in caplog.text
    assert lv.calls == []  # nothing restored
    assert not JobDir(requeued.paths.job_dir, JOB).path.exists()  # nothing made either
    hold = dataclasses.replace(
        requeued, checkpoint=dataclasses.replace(requeued.checkpoint, on_bad="hold")
    )
    checkpoint.mark_requeue(hold, JOB)  # as if requeued again (the fresh start cleared it)
    with pytest.raises(CheckpointRefusedError, match=re.escape(reason)):
        batch._restored(hold, spec, None)
    assert checkpoint.requeued(hold, JOB)  # kept for the admin


def test_a_restored_vm_gets_the_cpus_and_memory_limit_of_the_jobs_run_now(
    requeued: config.Config, lv: Libvirt, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinned to the new allocation's CPUs (not 5-6 of the saved run), held to the new
    run's memory limit (not the 600 MiB the checkpoint's run had); a smaller VM fits."""
    monkeypatch.setattr(checkpoint.ssh, "wait_for_ssh", lambda *a, **kw: "client")
    cp = checkpoint.newest_valid(requeued, JOB).checkpoint
    assert cp is not None
    name = domain_name(JOB)
    spec = _spec(vcpus=4, memory=1024, cpus=frozenset({0, 2}), memory_limit=1300)
    with connection.Connection(requeued.libvirt) as conn:
        endpoint, client = checkpoint.restore(requeued, cp, conn, name=name, spec=spec)
    assert (endpoint.port, client) == (2222, "client")
    assert lv.calls == [("restore", "memory.save"), ("limit", 1300), ("forward", name)]
    (restored,) = lv.restored
    assert read_pinning(restored) == "0,2" and "memtune" not in restored
    # Not pinned where this run is not.
    shutil.rmtree(JobDir(requeued.paths.job_dir, JOB).path)
    with connection.Connection(requeued.libvirt) as conn:
        checkpoint.restore(requeued, cp, conn, name=name, spec=_spec(memory_limit=None))
    assert read_pinning(lv.restored[-1]) is None
    assert [c for c in lv.calls if c[0] == "limit"] == [("limit", 1300)]  # none: no limit


def test_libvirtd_failing_during_a_restore_is_the_nodes_fault_and_keeps_the_checkpoint(
    requeued: config.Config, lv: Libvirt, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A libvirtd that does not answer while a checkpoint is restored: raised as such (the
    job is requeued by the node's failure policy), not as a bad checkpoint (which would
    start the job afresh or hold it); the job directory goes, the checkpoint stays."""
    cp = checkpoint.newest_valid(requeued, JOB).checkpoint
    assert cp is not None

    def down(self: Any, path: Path, xml: str, *, timeout: float) -> None:
        raise LibvirtUnavailableError("libvirt could not connect")

    monkeypatch.setattr(connection.Connection, "restore", down)
    with connection.Connection(requeued.libvirt) as conn, pytest.raises(LibvirtUnavailableError):
        checkpoint.restore(requeued, cp, conn, name=domain_name(JOB), spec=_spec())
    assert not JobDir(requeued.paths.job_dir, JOB).path.exists()
    assert checkpoint.newest_valid(requeued, JOB).checkpoint == cp


@pytest.mark.parametrize(
    ("marked", "taken_in", "restarts", "restored"),
    [
        (True, 0, 1, True),  # --stop, or a requeue the Epilog saw
        (True, None, None, True),  # Torque: the mark alone
        (False, 0, 1, True),  # Slurm: a later run (its node failed: no Epilog said so)
        (False, 2, 3, True),
        (False, 0, 0, False),  # the same run count: a job id that came back
        (False, 3, 0, False),  # ids restarted: the new job's count is lower
        (False, None, 1, False),  # no count in the manifest: nothing says it is this job's
        (False, 0, None, False),  # Torque without the mark
    ],
)
def test_only_a_later_run_of_the_same_job_restores_its_checkpoint(
    requeued: config.Config,
    lv: Libvirt,
    monkeypatch: pytest.MonkeyPatch,
    marked: bool,
    taken_in: int | None,
    restarts: int | None,
    restored: bool,
) -> None:
    """Leftovers under a job id that came back are never handed to the new job (even the
    same user's): removed, and the job boots afresh."""
    monkeypatch.setattr(checkpoint.ssh, "wait_for_ssh", lambda *a, **kw: "client")
    base = requeued.checkpoint.dir / JOB
    manifest = next(base.glob("*/manifest.json"))
    data = json.loads(manifest.read_bytes())
    data["restarts"] = taken_in
    manifest.write_text(json.dumps(data))  # its checksum is not in itself: still valid
    if not marked:
        checkpoint.clear_requeue(requeued, JOB)
    guest = batch._restored(requeued, _spec(), None, restarts)
    assert (guest is not None) == restored
    assert base.exists() == restored
    if guest is not None:
        guest.conn.close()
