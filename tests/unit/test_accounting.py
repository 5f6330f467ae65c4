"""The accounting line: each field for each way a job ends, the starter's marker, and how
the Slurm and Torque hooks learn the exit status the scheduler reports."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from vmbatch import config, limits
from vmbatch.errors import CommandError, GuestConnectionError, GuestLostError, HostError
from vmbatch.hooks import accounting, batch, entry, slurm, torque
from vmbatch.hooks.accounting import JobEnd, Marker, torque_end
from vmbatch.hooks.jobstate import FAILED, PREPARING, READY, Record, StateStore, UserDir
from vmbatch.process import Result

# A job whose prologue started at 100 and whose VM was ready at 104.
READY_RECORD = Record(
    "7", "slurm", "alice", phase=READY, image="demo", started=100.0, boot_seconds=4.0
)


def _line(
    record: Record | None = READY_RECORD,
    end: JobEnd = JobEnd(0, 0, "slurmctld"),  # noqa: B008 - frozen
    marker: Marker | None = None,
    ended: float = 110.0,
) -> dict[str, Any]:
    return accounting.line("7", record, end, marker, None, ended=ended, now=111.0)


def test_a_job_whose_script_ran_has_its_run_time_and_no_cause() -> None:
    line = _line(marker=Marker(started=105.0), end=JobEnd(3, 0, "slurmctld"))
    assert line["format"] == 2 and line["time"] == 111.0
    assert (line["script_ran"], line["run_seconds"], line["cause"]) == (True, 5.0, None)
    assert (line["exit_status"], line["exit_signal"], line["exit_source"]) == (3, 0, "slurmctld")
    assert (line["boot_seconds"], line["image"], line["user"]) == (4.0, "demo", "alice")
    assert line["prologue_started"] == 100.0


@pytest.mark.parametrize("forged", [50.0, 200.0, float("nan"), float("inf")])
def test_a_start_outside_the_vms_life_counts_from_its_readiness(forged: float) -> None:
    """The marker is the user's word: only a time between readiness and epilogue counts."""
    assert _line(marker=Marker(started=forged))["run_seconds"] == 6.0


def test_a_job_cancelled_during_boot_never_ran() -> None:
    line = _line(end=JobEnd(0, 0, "slurmctld", end_time=103.0, reason="Prolog"))
    assert (line["script_ran"], line["run_seconds"]) == (False, None)
    assert line["cause"] == accounting.CANCELLED_DURING_BOOT == "cancelled during boot"
    assert (line["exit_status"], line["exit_signal"]) == (0, 0)
    timeout = _line(end=JobEnd(0, 0, "slurmctld", end_time=104.0, reason="TimeLimit"))
    assert timeout["cause"] == "time limit reached during boot"


def test_a_job_ended_after_boot_before_its_script_says_so() -> None:
    line = _line(end=JobEnd(0, 0, "slurmctld", end_time=105.0))
    assert (line["script_ran"], line["cause"]) == (False, "the job ended before its script started")
    assert _line(end=JobEnd(0, 0))["cause"] == "the job ended before its script started"


def test_the_starters_reason_is_the_cause() -> None:
    line = _line(marker=Marker(not_started="GuestConnectionError: refused"))
    assert (
        line["cause"] == "the job starter did not start the script: GuestConnectionError: refused"
    )
    assert line["script_ran"] is False


def test_a_failed_prologue_gives_its_error_class_and_message() -> None:
    record = Record("7", "slurm", "alice", phase=FAILED, cause="GuestBootTimeoutError: no SSH")
    line = _line(record, JobEnd(65, 0, "slurmctld"), Marker(started=105.0))
    assert (line["script_ran"], line["run_seconds"]) == (False, None)  # no VM: no script
    assert line["cause"] == "GuestBootTimeoutError: no SSH" and line["boot_seconds"] is None
    killed = _line(Record("7", "slurm", "alice", phase=PREPARING, started=100.0))
    assert killed["cause"] == "the prologue ended before the VM was ready (killed, or timed out)"


def test_without_a_prologue_record_nothing_but_the_cause_is_known() -> None:
    line = _line(None, JobEnd())
    assert line["cause"] == "no prologue state (prologue did not run)"
    keys = ("user", "image", "exit_status", "exit_signal", "prologue_started")
    assert line["script_ran"] is False
    assert [line[k] for k in keys] == [None] * 5
    assert _line(None, torque_end(-2, "0"))["cause"].startswith("the scheduler did not start")


@pytest.mark.parametrize(
    ("status", "session", "end"),
    [
        (0, "4242", JobEnd(0, 0, "pbs_mom", job_started=True)),
        (3, "4242", JobEnd(3, 0, "pbs_mom", job_started=True)),
        (271, "4242", JobEnd(271, 15, "pbs_mom", job_started=True)),  # 256 + SIGTERM
        (-2, "0", JobEnd(-2, 0, "pbs_mom", job_started=False)),  # JOB_EXEC_FAIL2
        (None, None, JobEnd()),
        (1, "x", JobEnd(1, 0, "pbs_mom")),
    ],
)
def test_torques_exit_status_is_kept_and_its_signal_decoded(
    status: int | None, session: str | None, end: JobEnd
) -> None:
    assert torque_end(status, session) == end


def test_torque_job_pbs_mom_never_started_did_not_run_even_with_a_marker() -> None:
    line = _line(end=torque_end(-2, "0"), marker=Marker(started=105.0))
    assert line["script_ran"] is False
    assert line["cause"] == "the scheduler did not start the job (exit status -2)"


@pytest.mark.parametrize(
    ("raw", "pair"),
    [(0, (0, 0)), (7 << 8, (7, 0)), (3 << 8, (3, 0)), (15, (0, 15)), (9, (0, 9)),
     (253, (0, 125)), (0x7F, (0, 0)), (130 << 8, (130, 0))],
)  # fmt: skip
def test_slurm_exit_code_is_decoded_as_scontrol_prints_it(raw: int, pair: tuple[int, int]) -> None:
    assert slurm.decode_exit_code(raw) == pair


def _squeue(monkeypatch: pytest.MonkeyPatch, stdout: str) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv: list[str], **kw: object) -> Result:
        calls.append(argv)
        return Result(argv, 0, stdout, "")

    monkeypatch.setattr(slurm, "run_command", run)
    return calls


def test_slurm_job_end_asks_squeue_for_the_raw_code_end_time_restarts_and_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _squeue(monkeypatch, "768|2026-11-30T10:00:05|2|None\n")
    end = slurm.job_end(config.Config(), "42", {"SLURM_CONF": "/etc/x.conf", "OTHER": "1"})
    assert end == JobEnd(
        3,
        0,
        "slurmctld",
        time.mktime(time.strptime("2026-11-30T10:00:05", "%Y-%m-%dT%H:%M:%S")),
        "None",
        restarts=2,
    )
    assert calls[0][1:] == [
        "-h", "-t", "all", "-j", "42", "-O", "exit_code:|,EndTime:|,RestartCnt:|,Reason:"
    ]  # fmt: skip
    _squeue(monkeypatch, "15|Unknown|0|a|b\n")  # a reason may hold the separator
    assert slurm.job_end(config.Config(), "42", {}) == JobEnd(
        0, 15, "slurmctld", None, "a|b", restarts=0
    )


@pytest.mark.parametrize("stdout", ["", "x|y|z|w\n", "768\n", "768|Unknown|None\n"])
def test_slurm_job_end_without_a_record_is_a_host_error(
    monkeypatch: pytest.MonkeyPatch, stdout: str
) -> None:
    _squeue(monkeypatch, stdout)
    with pytest.raises(HostError, match="squeue gave no exit code of job 42"):
        slurm.job_end(config.Config(), "42", {})


def test_the_epilogs_restart_count_is_the_higher_of_its_environment_and_slurmctld(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kill message's credential already counts a requeue (SLURM_JOB_RESTART_COUNT);
    squeue too, unless slurmctld cannot be asked."""
    env = {"SLURM_JOB_EXIT_CODE2": "0:15", "SLURM_JOB_RESTART_COUNT": "2"}
    assert slurm.epilog_end(env) == JobEnd(0, 15, "epilog environment", restarts=2)
    assert slurm.epilog_end({**env, "SLURM_JOB_RESTART_COUNT": "x"}).restarts is None  # type: ignore[union-attr]
    monkeypatch.setattr(slurm, "job_end", lambda *a: JobEnd(0, 15, "slurmctld", restarts=1))
    assert entry._slurm_job_end(config.Config(), "42", env).restarts == 2
    monkeypatch.setattr(slurm, "job_end", lambda *a: JobEnd(0, 15, "slurmctld", restarts=3))
    assert entry._slurm_job_end(config.Config(), "42", env).restarts == 3
    monkeypatch.setattr(slurm, "job_end", lambda *a: JobEnd(0, 15, "slurmctld"))
    assert entry._slurm_job_end(config.Config(), "42", env).restarts == 2

    def unreachable(*a: object) -> JobEnd:
        raise CommandError("squeue failed")

    monkeypatch.setattr(slurm, "job_end", unreachable)
    assert entry._slurm_job_end(config.Config(), "42", env).restarts == 2


def test_the_epilog_prefers_slurmctld_and_logs_what_its_environment_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"SLURM_JOB_EXIT_CODE2": "0:0"}
    monkeypatch.setattr(slurm, "job_end", lambda *a: JobEnd(3, 0, "slurmctld"))
    with caplog.at_level(logging.INFO):
        assert entry._slurm_job_end(config.Config(), "42", env) == JobEnd(3, 0, "slurmctld")
    assert "slurmctld reports ExitCode=3:0; the Epilog's SLURM_JOB_EXIT_CODE2 was 0:0" in (
        caplog.text
    )

    def unreachable(*a: object) -> JobEnd:
        raise CommandError("squeue failed")

    monkeypatch.setattr(slurm, "job_end", unreachable)
    told = entry._slurm_job_end(config.Config(), "42", {"SLURM_JOB_EXIT_CODE2": "7:0"})
    assert told == JobEnd(7, 0, "epilog environment")
    assert entry._slurm_job_end(config.Config(), "42", {}) == JobEnd()


# -- the starter's marker ---------------------------------------------------------------


def test_markers_are_written_once_and_read_back(tmp_path: Path) -> None:
    ud = UserDir(tmp_path / "run", "7")
    ud.create(os.getuid(), os.getgid(), {UserDir.KEY: b"k"})
    assert accounting.read_marker(ud) is None
    accounting.mark_not_started(ud, "JobInterruptedError: interrupted\nby SIGTERM")
    assert accounting.read_marker(ud) == Marker(
        not_started="JobInterruptedError: interrupted?by SIGTERM"
    )
    accounting.mark_started(ud, 105.5)
    accounting.mark_started(ud, 999.0)  # a later step: the first start counts
    assert accounting.read_marker(ud) == Marker(started=105.5)
    assert oct((ud.path / UserDir.STARTED).stat().st_mode & 0o777) == "0o600"
    (ud.path / UserDir.STARTED).write_text("garbage")
    marker = accounting.read_marker(ud)
    assert marker is not None and marker.started != marker.started  # NaN: started, time unknown


def test_root_reads_no_pipe_link_or_missing_directory(tmp_path: Path) -> None:
    """The directory is the user's: a FIFO would block root's open, a link lead elsewhere."""
    ud = UserDir(tmp_path / "run", "7")
    assert accounting.read_marker(ud) is None
    ud.create(os.getuid(), os.getgid(), {})
    os.mkfifo(ud.path / UserDir.STARTED)
    secret = tmp_path / "secret"
    secret.write_text("1.0\n")
    (ud.path / UserDir.NOT_STARTED).symlink_to(secret)
    assert accounting.read_marker(ud) is None
    (ud.path / UserDir.STARTED).unlink()
    (ud.path / UserDir.STARTED).write_bytes(b"1" * 100_000)
    marker = accounting.read_marker(ud)
    assert marker is not None and marker.started == float("1" * 4096)  # read bounded


def test_a_marker_that_cannot_be_written_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ud = UserDir(tmp_path / "run", "7")  # no directory
    accounting.mark_started(ud, 1.0)
    assert "could not leave the accounting marker" in caplog.text


class _FakeSession:
    """Stands in for :class:`vmbatch.guest.session.Session` in the starter."""

    start_error: Exception | None = None
    follow_error: Exception | None = None
    interactive = False

    def __init__(self, **kw: object) -> None:
        self.client = None

    def start(self) -> None:
        if self.start_error is not None:
            raise self.start_error

    def follow(self, out: object, err: object) -> int:
        if self.follow_error is not None:
            raise self.follow_error
        return 5

    def attach(self, out: object, on_start: Any = None) -> int:
        on_start()
        return 6


def _starter_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[config.Config, UserDir]:
    import pwd

    cfg = config.parse({"batch": {"user_dir": str(tmp_path / "run")}})
    ud = UserDir(cfg.batch.user_dir, "7")
    info = {
        "host": "127.0.0.1",
        "port": 1,
        "user": pwd.getpwuid(os.getuid()).pw_name,
        "host_key": "k",
    }
    ud.create(
        os.getuid(), os.getgid(), {UserDir.KEY: b"k", UserDir.GUEST: json.dumps(info).encode()}
    )
    monkeypatch.setattr(batch, "Session", _FakeSession)
    for name in ("start_error", "follow_error", "interactive"):
        monkeypatch.setattr(_FakeSession, name, _FakeSession.__dict__[name])
    return cfg, ud


def _start(cfg: config.Config) -> int:
    job = batch.StarterJob("7", b"#!/bin/sh\n", (), {}, None)
    return batch.starter(cfg, job, io.BytesIO(), io.BytesIO())


def test_the_starter_marks_the_scripts_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, ud = _starter_site(tmp_path, monkeypatch)
    before = time.time()
    assert _start(cfg) == 5
    marker = accounting.read_marker(ud)
    # The marker holds milliseconds (rounded): it may read up to 0.5 ms before `before`.
    assert marker is not None and marker.started is not None
    assert marker.started >= before - 0.001


def test_the_starter_marks_an_interactive_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, ud = _starter_site(tmp_path, monkeypatch)
    monkeypatch.setattr(_FakeSession, "interactive", True)
    assert _start(cfg) == 6
    marker = accounting.read_marker(ud)
    assert marker is not None and marker.started is not None


def test_the_starter_says_why_the_script_did_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, ud = _starter_site(tmp_path, monkeypatch)
    monkeypatch.setattr(_FakeSession, "start_error", GuestConnectionError("upload failed"))
    with pytest.raises(GuestConnectionError):
        _start(cfg)
    assert accounting.read_marker(ud) == Marker(not_started="GuestConnectionError: upload failed")


def test_a_job_lost_after_its_start_still_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, ud = _starter_site(tmp_path, monkeypatch)
    monkeypatch.setattr(_FakeSession, "follow_error", GuestLostError("gone"))
    with pytest.raises(GuestLostError):
        _start(cfg)
    marker = accounting.read_marker(ud)
    assert marker is not None and marker.started is not None and marker.not_started is None


# -- the epilogue ------------------------------------------------------------------------


def _finish_cfg(tmp_path: Path) -> config.Config:
    return config.parse(
        {
            "paths": {"job_dir": str(tmp_path / "jobs"), "cache_dir": str(tmp_path / "cache")},
            "libvirt": {"uri": "test:///nowhere"},
            "batch": {
                "state_dir": str(tmp_path / "state"),
                "user_dir": str(tmp_path / "run"),
                "accounting_log": str(tmp_path / "acct.jsonl"),
            },
        }
    )


def test_the_epilogue_reads_the_marker_before_removing_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _finish_cfg(tmp_path)
    now = time.time()
    record = Record("7", "slurm", "alice", phase=FAILED, started=now - 20, boot_seconds=None)
    StateStore(cfg.batch.state_dir).write(record)
    ud = UserDir(cfg.batch.user_dir, "7")
    ud.create(os.getuid(), os.getgid(), {})
    accounting.mark_not_started(ud, "StarterError: x")
    asked: list[bool] = []

    def ask() -> JobEnd:
        asked.append(ud.path.exists())
        return JobEnd(65, 0, "slurmctld")

    batch.finish(cfg, "7", end=ask, account=True)
    assert not ud.path.exists() and asked == [False]  # asked after the teardown
    (line,) = (json.loads(ln) for ln in cfg.batch.accounting_log.read_text().splitlines())
    assert (line["exit_status"], line["script_ran"], line["cause"]) == (
        65,
        False,
        "the prologue failed",
    )


def test_an_unanswered_question_still_writes_the_line(tmp_path: Path) -> None:
    cfg = _finish_cfg(tmp_path)
    StateStore(cfg.batch.state_dir).write(Record("8", "slurm", "u", phase=FAILED))  # no VM

    def fails() -> JobEnd:
        raise RuntimeError("slurmctld away")

    batch.finish(cfg, "8", end=fails, account=True)
    (line,) = (json.loads(ln) for ln in cfg.batch.accounting_log.read_text().splitlines())
    assert (line["exit_status"], line["exit_source"]) == (None, None)


def test_write_accounting_returns_the_line_it_appends(tmp_path: Path) -> None:
    cfg = _finish_cfg(tmp_path)
    usage = limits.QemuUsage(1.5, 100)
    line = batch.write_accounting(
        cfg, "7", READY_RECORD, JobEnd(0, 0), usage, marker=Marker(started=105.0), ended=107.0
    )
    assert json.loads(cfg.batch.accounting_log.read_text()) == line
    assert (line["run_seconds"], line["qemu_cpu_seconds"]) == (2.0, 1.5)
    assert oct(cfg.batch.accounting_log.stat().st_mode & 0o777) == "0o640"


def test_epilogue_entry_passes_torques_status_and_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(entry, "_load", lambda path, **kw: _finish_cfg(tmp_path))
    monkeypatch.setattr(batch, "finish", lambda cfg, job_id, **kw: seen.update(kw, job_id=job_id))
    argv = ["epilogue", "12.srv", "alice", "g", "n", "0", "r", "u", "q", "", "-2", "/x.SC"]
    assert entry.run_epilogue(argv, {}) == 0
    assert seen["job_id"] == "12.srv" and seen["end"] == JobEnd(-2, 0, "pbs_mom", job_started=False)
    assert torque.epilogue_args(argv).session_id == "0"
