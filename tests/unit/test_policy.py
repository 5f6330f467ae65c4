"""The batch hooks' failure policy: whose fault decides the job's and the node's fate."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from vmbatch import config, state
from vmbatch.errors import (
    ConfigError,
    GuestBootTimeoutError,
    ImageCoolOffError,
    ImageDownloadError,
    ImageError,
    LibvirtUnavailableError,
    MountError,
    UnknownImageError,
)
from vmbatch.hooks import batch, policy
from vmbatch.hooks.accounting import JobEnd
from vmbatch.hooks.jobstate import UserDir
from vmbatch.hooks.policy import ImageHealth, Outcome
from vmbatch.hooks.request import Resources


def _cfg(tmp_path: Path, **batch_keys: object) -> config.Config:
    return config.parse(
        {
            "paths": {"job_dir": str(tmp_path / "jobs")},
            "libvirt": {"uri": "test:///nowhere"},
            "batch": {
                "default_image": "demo",
                "state_dir": str(tmp_path / "state"),
                "user_dir": str(tmp_path / "run"),
                "accounting_log": str(tmp_path / "acct.jsonl"),
                **batch_keys,
            },
            "images": {"demo": {"source": str(tmp_path / "missing.qcow2")}},
        }
    )


@pytest.mark.parametrize(
    ("error", "scheduler", "restarts", "outcome", "status"),
    [
        (UnknownImageError("no such image"), "slurm", 0, Outcome.FAIL, 65),
        (ImageError("not a disk image"), "slurm", 0, Outcome.FAIL, 65),
        (GuestBootTimeoutError("no SSH"), "slurm", 0, Outcome.FAIL, 75),
        (ImageDownloadError("server down"), "slurm", 0, Outcome.REQUEUE, 199),
        (MountError("nfs down"), "slurm", 2, Outcome.REQUEUE, 199),
        (MountError("nfs down"), "slurm", 3, Outcome.HOLD, 200),
        (ImageDownloadError("server down"), "torque", 0, Outcome.FAIL, 75),
        (LibvirtUnavailableError("gone"), "slurm", 0, Outcome.NODE, 69),
        (ConfigError(["bad"]), "torque", 0, Outcome.NODE, 69),
    ],
)
def test_only_node_faults_take_the_node_out(
    tmp_path: Path,
    error: Exception,
    scheduler: str,
    restarts: int,
    outcome: Outcome,
    status: int,
) -> None:
    from vmbatch.errors import VmBatchError

    assert isinstance(error, VmBatchError)
    d = policy.decide(_cfg(tmp_path), error, scheduler=scheduler, restarts=restarts, node="n1")
    assert (d.outcome, d.status) == (outcome, status)
    assert str(error) in d.message


def test_image_faults_requeue_when_configured_and_holding_can_be_turned_off(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, image_failure="requeue", hold_exit=0, max_requeues=1)
    err = GuestBootTimeoutError("no SSH within 8s")
    first = policy.decide(cfg, err, scheduler="slurm", restarts=0, node="n1")
    assert first.outcome is Outcome.REQUEUE and "node n1 stays in service" in first.message
    last = policy.decide(cfg, err, scheduler="slurm", restarts=1, node="n1")
    assert (last.outcome, last.status) == (Outcome.FAIL, 75)
    assert "already ran 2 times" in last.message


def test_restart_count_from_the_prolog_environment() -> None:
    assert policy.restart_count({"SLURM_JOB_RESTART_COUNT": "2"}) == 2
    assert policy.restart_count({}) == 0
    assert policy.restart_count({"SLURM_JOB_RESTART_COUNT": "x"}) == 0


def test_an_image_failing_again_and_again_is_refused_for_its_cooloff(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, image_failures=3, image_failure_window=100.0, image_cooloff=50.0)
    health = ImageHealth(cfg)
    err = GuestBootTimeoutError("no SSH within 8s")
    assert not health.failed("demo", err, now=1000.0)
    assert not health.failed("demo", err, now=1150.0)  # the first is out of the window
    assert not health.failed("demo", err, now=1160.0)
    health.check("demo", now=1161.0)  # two in the window: still used
    assert health.failed("demo", err, now=1170.0)
    with pytest.raises(ImageCoolOffError, match="failed on this node 3 times") as info:
        health.check("demo", now=1200.0)
    assert "vmbatch image cooloff --clear demo" in str(info.value)
    assert not policy.counts_against_image(info.value)  # a refusal is not a new failure
    health.check("demo", now=1221.0)  # the cool-off is over
    health.check("other", now=1200.0)
    assert oct(health.path.stat().st_mode & 0o777) == "0o600"
    assert oct(health.path.parent.stat().st_mode & 0o777) == "0o700"


def test_a_boot_forgets_the_failures_and_an_admin_can_lift_a_cooloff(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, image_failures=2)
    health = ImageHealth(cfg)
    err = GuestBootTimeoutError("no SSH")
    health.failed("demo", err)
    health.succeeded("demo")
    assert not health.failed("demo", err)  # counting starts again
    assert health.failed("demo", err)
    with pytest.raises(ImageCoolOffError):
        health.check("demo")
    assert health.clear("demo") == ["demo"]
    health.check("demo")
    assert health.statuses() == []


def test_a_failed_image_reaches_the_job_with_the_policys_exit_status(tmp_path: Path) -> None:
    """The prologue (exit 0) leaves the message and status; the starter exits with it."""
    cfg = _cfg(tmp_path, image_failures=1)
    user = "nobody"
    bj = batch.BatchJob("slurm", "78", user, Resources(), restarts=0)
    error = batch.prologue(cfg, bj)
    assert isinstance(error, ImageError) and error.fault is policy.Fault.IMAGE
    userdir = UserDir(cfg.batch.user_dir, "78")
    assert userdir.read(UserDir.STATUS) == b"65\n"
    with pytest.raises(ImageCoolOffError):
        ImageHealth(cfg).check("demo")  # one failure was enough here
    # the next job is refused without trying, and that refusal is not counted again
    error = batch.prologue(cfg, batch.BatchJob("slurm", "79", user, Resources()))
    assert isinstance(error, ImageCoolOffError)
    assert len(ImageHealth(cfg).statuses()[0].failures) == 1
    job = batch.StarterJob("78", b"#!/bin/sh\n", (), {}, None)
    with pytest.raises(batch.PrologueFailedError) as info:
        batch.starter(cfg, job, io.BytesIO(), io.BytesIO())
    assert info.value.status == 65 and "missing.qcow2" in str(info.value)


def test_requeue_and_hold_need_different_exit_statuses(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="requeue_exit and hold_exit are both 199"):
        _cfg(tmp_path, hold_exit=199)


def test_slurm_exit_code_lists_for_the_doctors_requeue_check() -> None:
    from vmbatch.doctor import exit_codes

    assert exit_codes("199") == {199}
    assert exit_codes("1-3,18") == {1, 2, 3, 18}
    assert exit_codes("(null)") == set()


def test_an_epilogue_run_again_after_a_crash_writes_no_second_accounting_line(
    tmp_path: Path,
) -> None:
    from vmbatch.hooks.jobstate import FAILED, Record, StateStore

    cfg = _cfg(tmp_path)
    store = StateStore(cfg.batch.state_dir)
    store.write(Record("80", "slurm", "u", phase=FAILED, cause="JobError: x", accounted=True))
    # The first run had written it.
    batch.finish(cfg, "80", end=JobEnd(1, 0, "slurmctld"), account=True)
    assert not cfg.batch.accounting_log.exists() and store.read("80") is None
    store.write(Record("81", "slurm", "u", phase=FAILED, cause="JobError: x"))
    batch.finish(cfg, "81", end=JobEnd(1, 0, "slurmctld"), account=True)
    assert len(cfg.batch.accounting_log.read_text().splitlines()) == 1


def test_the_node_stays_out_while_the_hook_that_drained_it_still_runs(tmp_path: Path) -> None:
    """Found by bench/soak.py: the reaper resumed the node between a failing Prolog's drain
    and its exit, and slurmctld then drained it again as "Prolog error", a reason vmbatch
    never undoes. While the draining hook (here: this process) lives, the node stays out,
    before the scheduler or the node checks are even asked."""
    cfg = _cfg(tmp_path)
    hook = state.process_identity(os.getpid())
    assert hook is not None
    policy.mark_out(cfg, policy.NodeMark("slurm", "n1", "vmbatch: libvirt gone", 1.0, hook=hook))
    assert policy.read_mark(cfg) == policy.NodeMark(
        "slurm", "n1", "vmbatch: libvirt gone", 1.0, hook=hook
    )
    checked: list[bool] = []
    said = policy.resume_node(cfg, failing=lambda: checked.append(True) or [])
    assert said is not None and "stays out of service" in said and f"pid {os.getpid()}" in said
    assert checked == [] and policy.read_mark(cfg) is not None


def test_two_hooks_taking_the_node_out_at_once_record_the_reason_it_kept(
    tmp_path: Path,
) -> None:
    """Found by bench/soak.py: two Prologs failing at once drained the node in one order and
    recorded their reasons in the other; the reaper then took vmbatch's own drain for an
    admin's and left the node out for good. Drain and record are one step now: a second
    hook's drain waits until the first one's record is written."""
    cfg = _cfg(tmp_path)
    node_reason: list[str] = []  # what the scheduler shows, last one wins
    second_done = threading.Event()

    def second() -> None:
        policy.take_out(cfg, lambda: node_reason.append("vmbatch: B") or "vmbatch: B", mark)
        second_done.set()

    def first_out() -> str:
        node_reason.append("vmbatch: A")
        threading.Thread(target=second).start()
        second_done.wait(0.5)  # without the lock, the second hook would finish in here
        return "vmbatch: A"

    def mark(reason: str) -> policy.NodeMark:
        return policy.NodeMark("slurm", "n1", reason, 1.0)

    assert policy.take_out(cfg, first_out, mark) == "vmbatch: A"
    assert second_done.wait(10)
    recorded = policy.read_mark(cfg)
    assert recorded is not None and recorded.reason == node_reason[-1] == "vmbatch: B"


def test_a_jobs_own_exit_status_never_requeues_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by bench/soak.py: a script ending `exit 199` was requeued by RequeueExit after
    every run. Its status becomes 1, with the reason on its stderr; others pass through."""
    from vmbatch.hooks import entry

    cfg = _cfg(tmp_path)
    assert [entry.reserved_status(cfg, s) for s in (0, 7, 198, 255)] == [0, 7, 198, 255]
    assert capsys.readouterr().err == ""
    assert entry.reserved_status(cfg, 199) == 1 and entry.reserved_status(cfg, 200) == 1
    assert "reserves for vmbatch's requeues" in capsys.readouterr().err
