"""Keeping a failed job's VM ([batch].keep_failed): who is kept, how, and when the reaper
lets go. The epilogue's libvirt side runs against real VMs in tests/system/test_ops.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vmbatch import config
from vmbatch.errors import ConfigError, JobError
from vmbatch.hooks import batch
from vmbatch.hooks.accounting import JobEnd
from vmbatch.hooks.jobstate import KEPT, READY, Record
from vmbatch.hooks.request import Resources, directives
from vmbatch.reaper import Job, Verdict, judge

NOW, BOOT = 1_000_000.0, "boot-1"


def _cfg(tmp_path: Path, text: str) -> config.Config:
    f = tmp_path / "vmbatch.toml"
    f.write_text("[batch]\n" + text)
    return config.load(f)


def _bj(script: bytes | None) -> batch.BatchJob:
    return batch.BatchJob("slurm", "42", "alice", Resources(), script=script)


@pytest.mark.parametrize(
    ("settings", "keep", "status", "mode"),
    [
        ("", "", 1, None),  # the default keeps nothing
        ('keep_failed = "paused"', "", 0, None),  # a job that succeeded is never kept
        ('keep_failed = "paused"', "", None, None),  # exit status unknown: not a failure
        ('keep_failed = "paused"', "", 3, "paused"),
        ('keep_failed = "disks"', "", 3, "disks"),
        ('keep_failed = "disks"', "no", 3, None),  # the job opted out
        ('keep_failed = "disks"', "yes", 3, "disks"),
        ('keep_failed = "no"', "yes", 3, "paused"),  # asked (user_keep): paused
        ('keep_failed = "no"', "yes", 0, None),
    ],
)
def test_keep_mode(
    tmp_path: Path, settings: str, keep: str, status: int | None, mode: str | None
) -> None:
    cfg = _cfg(tmp_path, settings + "\nuser_keep = true\n")
    record = Record("42", "slurm", "alice", phase=READY, keep=keep)
    assert batch.keep_mode(cfg, record, JobEnd(exit_status=status)) == mode


@pytest.mark.parametrize(
    ("end", "why"),
    [
        (JobEnd(exit_status=0, exit_signal=15), "scancel: Slurm's ExitCode=0:15"),
        (JobEnd(exit_status=271, exit_signal=15), "qdel: Torque's 256+SIGTERM"),
        (JobEnd(exit_status=-1, job_started=False), "Torque never started it (session 0)"),
        (JobEnd(exit_status=1, end_time=NOW + 5), "Slurm ended it before its VM was ready"),
    ],
)
def test_a_cancelled_job_is_never_kept(tmp_path: Path, end: JobEnd, why: str) -> None:
    cfg = _cfg(tmp_path, 'keep_failed = "paused"\nuser_keep = true\n')
    record = Record("42", "slurm", "alice", phase=READY, keep="yes", started=NOW,
                    boot_seconds=10.0)  # fmt: skip
    assert batch.keep_mode(cfg, record, end) is None, why
    ran = dataclasses.replace(end, exit_status=1, exit_signal=0, job_started=True,
                              end_time=NOW + 60)  # fmt: skip
    assert batch.keep_mode(cfg, record, ran) == "paused"


def test_keep_request_is_honoured_only_where_the_site_allows_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = b"#!/bin/sh\n#VMBATCH keep=yes\nfalse\n"
    assert batch.keep_request(_cfg(tmp_path, "user_keep = true"), _bj(script)) == "yes"
    assert batch.keep_request(_cfg(tmp_path, ""), _bj(script)) == ""
    assert "ignored: this site does not let jobs choose" in caplog.text
    assert batch.keep_request(_cfg(tmp_path, ""), _bj(None)) == ""
    assert batch.keep_request(_cfg(tmp_path, ""), _bj(b"#!/bin/sh\ntrue\n")) == ""


def test_keep_request_must_be_yes_or_no(tmp_path: Path) -> None:
    assert directives(b"#VMBATCH keep=maybe\n") == {"keep": "maybe"}
    with pytest.raises(JobError, match="keep=maybe"):
        batch.keep_request(_cfg(tmp_path, "user_keep = true"), _bj(b"#VMBATCH keep=maybe\n"))


def test_keep_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _cfg(tmp_path, 'keep_failed = "forever"\nkeep_failed_for = 0\nkeep_failed_max = -1\n')
    text = str(exc.value)
    assert "[batch].keep_failed: expected one of 'no', 'paused', 'disks'" in text
    assert "[batch].keep_failed_for: must be > 0 seconds" in text
    assert "[batch].keep_failed_max: must be >= 0" in text


def _kept(until: float) -> Job:
    rec = Record("42", "slurm", "alice", phase=KEPT, kept_as="paused", kept_until=until,
                 boot_id=BOOT, started=NOW - 86400)  # fmt: skip
    return Job("42", "42", record=rec, domains=["vmbatch-42"])


def _never(scheduler: str, job_id: str) -> Verdict:
    raise AssertionError("a kept job's fate is its time, not the scheduler's")


def test_the_reaper_keeps_a_kept_job_until_its_time_without_asking_the_scheduler() -> None:
    verdict = judge(_kept(NOW + 1), now=NOW, boot=BOOT, grace=600, libvirt_ok=True, ask=_never)
    assert verdict.runs is True
    assert "kept for inspection until" in verdict.reason


def test_the_reaper_removes_a_kept_job_after_its_time() -> None:
    verdict = judge(_kept(NOW - 1), now=NOW, boot=BOOT, grace=600, libvirt_ok=True, ask=_never)
    assert verdict.runs is False
    assert "time is up" in verdict.reason


def test_a_kept_job_from_before_a_reboot_is_gone() -> None:
    job = _kept(NOW + 1000)
    assert job.record is not None
    job.record = dataclasses.replace(job.record, boot_id="boot-0")
    assert judge(job, now=NOW, boot=BOOT, grace=600, libvirt_ok=True, ask=_never).runs is False


@pytest.mark.parametrize(
    ("settings", "keep", "may"),
    [
        ("", "", False),  # the epilogue then asks the scheduler only after the teardown
        ("", "yes", True),  # asked, where user_keep allowed it (recorded only then)
        ('keep_failed = "paused"', "", True),
        ('keep_failed = "paused"', "no", False),
        ("user_keep = true", "yes", True),
    ],
)
def test_may_keep_agrees_with_keep_mode(
    tmp_path: Path, settings: str, keep: str, may: bool
) -> None:
    """The epilogue asks the scheduler for the exit status before the teardown only where
    some status would keep the VM (may_keep): never for a site that keeps nothing."""
    cfg = _cfg(tmp_path, settings)
    rec = Record("42", "slurm", "alice", phase=READY, keep=keep)
    assert batch.may_keep(cfg, rec) is may
    assert (batch.keep_mode(cfg, rec, JobEnd(exit_status=3)) is not None) is may
