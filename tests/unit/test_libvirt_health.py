"""libvirtd health: the probe's reasons, the restart budget across processes, the config."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.unit.conftest import FakeClock
from vmbatch import config
from vmbatch.errors import CommandError, ConfigError, HostError
from vmbatch.hooks import batch
from vmbatch.hooks.jobstate import FAILED, Record, StateStore
from vmbatch.libvirt import health
from vmbatch.libvirt.health import Restart, RestartLog

#: PIDs above pid_max (at most 2**22, proc(5)) never name a process.
NO_SUCH_PID = 2**22 + 1


def _cfg(tmp_path: Path, **libvirt: Any) -> config.Config:
    return config.parse(
        {
            "libvirt": {
                "restart_command": ["/usr/local/sbin/restart-libvirtd"],
                "restart_max": 2,
                "restart_window": 3600,
                "restart_wait": 10,
                "timeout": 2,
                "pid_file": str(tmp_path / "libvirtd.pid"),
                **libvirt,
            },
            "batch": {"state_dir": str(tmp_path / "state")},
        }
    )


class FakeNode:
    """libvirtd as :func:`health.check` sees it, and the restart command's runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answers: Sequence[str | None]) -> None:
        self.answers = list(answers)
        self.runs: list[tuple[str, ...]] = []
        self.fail_command = False
        monkeypatch.setattr(health, "check", self.check)
        monkeypatch.setattr(health.process, "run", self.run)

    def check(self, cfg: config.Config) -> str | None:
        # The last answer repeats: a libvirtd that stays down (or up).
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def run(self, argv: Sequence[str], *, timeout: float, **kw: Any) -> None:
        self.runs.append(tuple(argv))
        if self.fail_command:
            raise CommandError("restart-libvirtd failed: no such unit")


HUNG = "libvirtd does not answer within 2 s"


# -- configuration --------------------------------------------------------------------


def test_health_keys_have_sane_defaults_and_root_trusts_what_it_runs() -> None:
    lv = config.LibvirtConfig()
    assert lv.restart_command[0] == "/usr/bin/systemctl"
    assert (lv.restart_max, lv.restart_window, lv.restart_wait) == (3, 3600.0, 60.0)
    assert (lv.max_rss_mib, lv.pid_file) == (0, Path("/run/libvirtd.pid"))
    cfg = config.parse({"libvirt": {"restart_command": ["/opt/site/restart", "--now"]}})
    paths = config.root_paths(cfg)
    assert Path("/opt/site/restart") in paths and Path("/run/libvirtd.pid") in paths
    never = config.parse({"libvirt": {"restart_command": []}})
    assert never.libvirt.restart_command == ()
    assert Path("/usr/bin/systemctl") not in config.root_paths(never)


def test_every_bad_health_key_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(
            {
                "libvirt": {
                    "restart_command": ["systemctl", "restart", "libvirtd"],
                    "restart_max": -1,
                    "restart_window": 0,
                    "restart_wait": -5,
                    "max_rss_mib": -1,
                    "pid_file": "run/libvirtd.pid",
                }
            }
        )
    text = str(info.value)
    for key in ("restart_command", "restart_max", "restart_window", "restart_wait"):
        assert f"[libvirt].{key}: must be" in text
    assert "[libvirt].max_rss_mib: must be >= 0" in text
    assert "[libvirt].pid_file: must be an absolute path" in text
    with pytest.raises(ConfigError, match="no item empty"):
        config.parse({"libvirt": {"restart_command": ["/bin/sh", ""]}})
    with pytest.raises(ConfigError, match=r"restart_command: expected a list of strings"):
        config.parse({"libvirt": {"restart_command": "/usr/bin/systemctl restart libvirtd"}})


# -- the window and the record --------------------------------------------------------


def test_only_restarts_within_the_window_count() -> None:
    now = 100_000.0
    restarts = [
        Restart(now - 3600, "an hour ago: out"),
        Restart(now - 10, "b"),
        Restart(now - 3599, "a"),
        Restart(now + 60, "after the clock was set back: in"),
        Restart(now + 7200, "far future: out"),
    ]
    kept = health.in_window(restarts, now, 3600)
    assert [r.reason for r in kept] == ["a", "b", "after the clock was set back: in"]


def test_the_record_is_root_only_and_survives_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.umask(0o022)
    record = RestartLog(tmp_path / "state")
    assert record.read() == []
    record.write([Restart(1.5, "dead"), Restart(2.5, "hung")])
    assert record.read() == [Restart(1.5, "dead"), Restart(2.5, "hung")]
    assert stat.S_IMODE(record.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(record.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    # Not a job record: the job state's *.json listing does not see it.
    assert StateStore(tmp_path / "state").records() == []
    record.path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert record.read() == []
    assert "unreadable" in caplog.text
    record.path.write_text(json.dumps({"restarts": [{"time": "x"}, 3, {"time": 4, "reason": 1}]}))
    assert record.read() == [Restart(4.0, "1")]


# -- recovery -------------------------------------------------------------------------


def test_a_healthy_libvirtd_is_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = FakeNode(monkeypatch, [None])
    assert health.recover(_cfg(tmp_path), "libvirt did not answer within 2s")
    assert node.runs == []
    assert RestartLog(tmp_path / "state").read() == []


def test_restarts_are_counted_across_calls_until_the_budget_is_spent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path)
    node = FakeNode(monkeypatch, [HUNG, None])
    with caplog.at_level(logging.WARNING):
        assert health.recover(cfg, "libvirt did not start domain x within 2s")
    assert node.runs == [("/usr/local/sbin/restart-libvirtd",)]
    assert f"libvirtd restarted (1/2 in the last 3600 s): {HUNG}" in caplog.text
    node.answers = [HUNG, None]
    assert health.recover(cfg, "again")
    node.answers = [HUNG]
    outcome = health.recovery(cfg, "and again")
    assert not outcome.healthy
    assert outcome.detail == (
        f"{HUNG}; libvirtd restarts exhausted (2/2 in the last 3600 s, [libvirt].restart_max)"
    )
    assert len(node.runs) == 2, "no third restart within the window"
    assert [r.reason for r in RestartLog(tmp_path / "state").read()] == [HUNG, HUNG]


def test_restarts_older_than_the_window_do_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, restart_max=1, restart_window=60)
    RestartLog(tmp_path / "state").write([Restart(0.0, "long ago")])
    node = FakeNode(monkeypatch, [HUNG, None])
    assert health.recover(cfg, "x")
    assert len(node.runs) == 1
    # The record keeps only what still counts.
    assert [r.reason for r in RestartLog(tmp_path / "state").read()] == [HUNG]


def test_no_restart_when_restarts_are_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = FakeNode(monkeypatch, [HUNG])
    for off in ({"restart_command": []}, {"restart_max": 0}):
        outcome = health.recovery(_cfg(tmp_path, **off), "x")
        assert not outcome.healthy and "vmbatch does not restart it" in outcome.detail
    assert node.runs == []


def test_a_failed_restart_command_counts_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = FakeNode(monkeypatch, [HUNG])
    node.fail_command = True
    outcome = health.recovery(_cfg(tmp_path), "x")
    assert not outcome.healthy
    assert "restarting libvirtd (1/2 in the last 3600 s) failed: restart-libvirtd failed" in (
        outcome.detail
    )
    assert len(RestartLog(tmp_path / "state").read()) == 1


def test_a_restart_that_does_not_help_waits_restart_wait_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    node = FakeNode(monkeypatch, [HUNG])
    start = clock.now
    outcome = health.recovery(_cfg(tmp_path, restart_wait=10), "x")
    assert not outcome.healthy
    assert outcome.detail == (
        "libvirtd was restarted (1/2 in the last 3600 s) but does not answer within 2 s"
        " after [libvirt].restart_wait 10 s"
    )
    assert len(node.runs) == 1
    assert 10 <= clock.now - start < 13, "polled until restart_wait, not longer"


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[None]:
    """Another hook holds the restart lock (flock on another open file description)."""
    record = RestartLog(tmp_path / "state")
    record.write([])
    fd = os.open(record.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


@pytest.mark.usefixtures("held_lock")
def test_while_another_hook_restarts_libvirtd_none_restarts_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    cfg = _cfg(tmp_path)
    node = FakeNode(monkeypatch, [None])
    start = clock.now
    assert health.recover(cfg, "x"), "healthy after the other hook's restart"
    assert clock.now - start >= health.lock_wait(cfg)
    node.answers = [HUNG]
    outcome = health.recovery(cfg, "x")
    assert not outcome.healthy and "another vmbatch hook has been restarting it" in outcome.detail
    assert node.runs == []


# -- memory ---------------------------------------------------------------------------


def test_libvirtd_is_restarted_when_its_rss_passes_the_ceiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "libvirtd.pid").write_text(f"{os.getpid()}\n")  # this process stands in
    rss = health.rss_mib(_cfg(tmp_path))
    assert rss is not None and rss > 1
    node = FakeNode(monkeypatch, [None])
    assert not health.maybe_restart_for_rss(_cfg(tmp_path))  # no ceiling by default
    assert not health.maybe_restart_for_rss(_cfg(tmp_path, max_rss_mib=rss + 10_000))
    assert node.runs == []
    with caplog.at_level(logging.WARNING):
        assert health.maybe_restart_for_rss(_cfg(tmp_path, max_rss_mib=1))
    assert len(node.runs) == 1
    assert "libvirtd restarted (1/2 in the last 3600 s): its memory (RSS" in caplog.text
    assert "passed [libvirt].max_rss_mib (1 MiB)" in caplog.text
    assert health.maybe_restart_for_rss(_cfg(tmp_path, max_rss_mib=1))
    # Over the ceiling with the budget spent: logged, the job goes on, no restart.
    assert not health.maybe_restart_for_rss(_cfg(tmp_path, max_rss_mib=1))
    assert len(node.runs) == 2
    assert "libvirtd restarts exhausted (2/2" in caplog.text


def test_rss_is_unknown_without_a_live_pid(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert health.rss_mib(cfg) is None
    (tmp_path / "libvirtd.pid").write_text(f"{NO_SUCH_PID}\n")
    assert health.rss_mib(cfg) is None
    (tmp_path / "libvirtd.pid").write_text("garbage\n")
    assert health.rss_mib(cfg) is None


# -- the probe ------------------------------------------------------------------------


def test_a_libvirtd_that_answers_is_healthy(tmp_path: Path, test_uri: str) -> None:
    assert health.check(_cfg(tmp_path, uri=test_uri)) is None


def test_socket_paths_of_local_system_uris() -> None:
    assert health.socket_path("qemu:///system") == Path("/run/libvirt/libvirt-sock")
    assert health.socket_path("qemu+unix:///system?socket=/x/s") == Path("/x/s")
    assert health.socket_path("qemu+ssh://node/system") is None
    assert health.socket_path("qemu:///session") is None


@pytest.mark.usefixtures("clock")
def test_a_missing_socket_and_a_dead_pid_are_named(tmp_path: Path) -> None:
    sock = tmp_path / "libvirt-sock"
    cfg = _cfg(tmp_path, uri=f"qemu+unix:///system?socket={sock}")
    assert health.check(cfg) == f"libvirtd is not running: its socket {sock} is missing"
    (tmp_path / "libvirtd.pid").write_text(f"{NO_SUCH_PID}\n")
    assert health.check(cfg) == (
        f"libvirtd is dead (pid {NO_SUCH_PID} from {tmp_path / 'libvirtd.pid'} is gone)"
    )


def test_a_libvirtd_that_accepts_but_never_answers_times_out(tmp_path: Path) -> None:
    path = tmp_path / "libvirt-sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)  # connections wait in the backlog; nothing ever answers
        cfg = _cfg(tmp_path, uri=f"qemu+unix:///system?socket={path}", timeout=0.5)
        assert health.check(cfg) == "libvirtd does not answer within 0.5 s"


# -- the epilogue after a prologue libvirtd failed ------------------------------------


@pytest.mark.usefixtures("clock")
def test_a_prologue_failed_by_libvirtd_is_finished_through_libvirt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its teardown may not have reached libvirtd, so its VM may run on: while a QEMU
    process of its domain runs, the epilogue must make sure through libvirt, and says so
    while libvirtd is unreachable (record kept); without one, nothing of it runs."""
    from vmbatch import reaper

    qemus = [reaper.QemuProcess(4242, "4242:1:boot", "vmbatch-5", None)]
    monkeypatch.setattr(reaper, "find_qemus", lambda job_dir, emulator: qemus)
    cfg = config.parse(
        {
            "paths": {"job_dir": str(tmp_path / "jobs")},
            "libvirt": {"uri": f"qemu+unix:///system?socket={tmp_path / 'none'}"},
            "batch": {
                "state_dir": str(tmp_path / "state"),
                "user_dir": str(tmp_path / "run"),
                "accounting_log": str(tmp_path / "acct.jsonl"),
            },
        }
    )
    store = StateStore(cfg.batch.state_dir)
    failed = Record("5", "slurm", "u", phase=FAILED, cause="LibvirtTimeoutError: libvirt did not")
    store.write(failed)
    with pytest.raises(HostError, match="could not make sure its VM vmbatch-5 is gone"):
        batch.finish(cfg, "5")
    assert store.read("5") == failed
    qemus.clear()  # the VM's QEMU is gone: files only, even with libvirtd unreachable
    batch.finish(cfg, "5")
    assert store.read("5") is None
    store.write(Record("6", "slurm", "u", phase=FAILED, cause="JobError: no such user"))
    batch.finish(cfg, "6")  # nothing was started: no libvirt needed
    assert store.read("6") is None
