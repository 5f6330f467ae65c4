"""``vmbatch check`` (Nagios status line and exit codes, bounded time, --take-out) and
``vmbatch doctor --json``, through click's test runner; and the checks they add to doctor."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from vmbatch import check, cli, config, doctor
from vmbatch.doctor import Check, Severity
from vmbatch.hooks import policy, slurm, torque
from vmbatch.hooks.jobstate import StateStore

OK = Check(True, "libvirtd", "libvirt 9.0.0", perf=("cache=0B;;;0;",))
WARN = Check(False, "orphans", "2 leftover(s)", "run `vmbatch cleanup --stale`", Severity.WARNING)
CRIT = Check(False, "free space", "only 1.0 GiB | free", "free space")


def _conf(tmp_path: Path, extra: str = "") -> Path:
    f = tmp_path / "vmbatch.toml"
    f.write_text(
        f'[paths]\njob_dir = "{tmp_path}/jobs"\ncache_dir = "{tmp_path}/cache"\n'
        f'[batch]\nstate_dir = "{tmp_path}/state"\nuser_dir = "{tmp_path}/users"\n'
        f'accounting_log = "{tmp_path}/acct.jsonl"\n'
        f'[tools]\nscontrol = "{tmp_path}/bin/scontrol"\nsqueue = "{tmp_path}/bin/squeue"\n'
        f'pbsnodes = "{tmp_path}/bin/pbsnodes"\n'
        f'[libvirt]\nuri = "test:///default"\n[vm]\naccel = "tcg"\n[metrics]\ntextfile = ""\n'
        + extra
    )
    return f


def _invoke(conf: Path, *args: str) -> Result:
    return CliRunner().invoke(cli.cli, ["-c", str(conf), *args])


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[doctor.Step]]:
    """The checks `vmbatch check` runs, as a test sets them."""
    chosen: list[doctor.Step] = []
    monkeypatch.setattr(doctor, "health_checks", lambda cfg: chosen)
    yield chosen


def _step(c: Check) -> doctor.Step:
    return (c.what, lambda: [c])


# -- the status line and the exit status -----------------------------------------------


def test_all_ok_is_one_line_and_exit_0(tmp_path: Path, steps: list[doctor.Step]) -> None:
    steps += [_step(OK), _step(Check(True, "accelerator", "TCG"))]
    res = _invoke(_conf(tmp_path), "check")
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert len(lines) == 1
    text, _, perf = lines[0].partition(" | ")
    assert text == "VMBATCH OK - 2 checks passed"
    assert perf.split()[0] == "checks=2;;;0"
    assert perf.split()[1].startswith("time=") and perf.split()[1].endswith("s;;20;0")
    assert "cache=0B;;;0;" in perf.split()


def test_a_warning_is_exit_1(tmp_path: Path, steps: list[doctor.Step]) -> None:
    steps += [_step(OK), _step(WARN)]
    res = _invoke(_conf(tmp_path), "check")
    assert res.exit_code == 1
    assert res.output.startswith("VMBATCH WARNING - 1 warning: orphans: 2 leftover(s) | ")


def test_critical_is_exit_2_and_named_first_without_a_pipe_in_the_text(
    tmp_path: Path, steps: list[doctor.Step]
) -> None:
    steps += [_step(WARN), _step(OK), _step(CRIT)]
    res = _invoke(_conf(tmp_path), "check")
    assert res.exit_code == 2
    line = res.output.splitlines()[0]
    assert line.startswith(
        "VMBATCH CRITICAL - 1 critical, 1 warning: free space: only 1.0 GiB / free;"
        " orphans: 2 leftover(s) | "
    )
    assert line.count("|") == 1


def test_a_check_that_raises_is_critical_and_the_rest_still_run(
    tmp_path: Path, steps: list[doctor.Step]
) -> None:
    def broken() -> list[Check]:
        raise RuntimeError("boom")

    steps += [("accelerator", broken), _step(OK)]
    res = _invoke(_conf(tmp_path), "check", "--verbose")
    assert res.exit_code == 2
    assert "accelerator: the check itself failed: RuntimeError('boom')" in res.output
    assert "ok   libvirtd: libvirt 9.0.0" in res.output


def test_a_check_that_does_not_finish_in_time_is_critical(
    tmp_path: Path, steps: list[doctor.Step]
) -> None:
    release = threading.Event()

    def hangs() -> list[Check]:
        release.wait(60)
        return [OK]

    steps += [_step(OK), ("libvirtd", hangs), _step(WARN)]
    try:
        res = _invoke(_conf(tmp_path), "check", "--timeout", "0.2", "-v")
    finally:
        release.set()
    assert res.exit_code == 2
    out = res.output.splitlines()
    assert out[0].startswith(
        "VMBATCH CRITICAL - 2 critical: libvirtd: did not finish within"
        " [health].timeout (0.2 s); orphans: not run: an earlier check did not finish"
    )
    assert "time=" in out[0] and ";;0.2;0" in out[0]
    assert out[1:] == [
        "ok   libvirtd: libvirt 9.0.0",
        "FAIL libvirtd: did not finish within [health].timeout (0.2 s)",
        "     fix: see `vmbatch doctor` for what hangs",
        "FAIL orphans: not run: an earlier check did not finish",
        "     fix: see `vmbatch doctor` for what hangs",
    ]


def test_the_timeout_comes_from_the_configuration(tmp_path: Path, steps: list[doctor.Step]) -> None:
    steps.append(_step(OK))
    res = _invoke(_conf(tmp_path, "[health]\ntimeout = 7.5\n"), "check")
    assert ";;7.5;0" in res.output


@pytest.mark.parametrize("value", ["0", "301", "soon"])
def test_bad_options_are_unknown_not_critical(
    tmp_path: Path, steps: list[doctor.Step], value: str
) -> None:
    res = _invoke(_conf(tmp_path), "check", "--timeout", value)
    assert res.exit_code == 3
    assert "--timeout" in res.output


def test_an_unknown_option_is_unknown(tmp_path: Path, steps: list[doctor.Step]) -> None:
    assert _invoke(_conf(tmp_path), "check", "--bogus").exit_code == 3


def test_not_root_is_unknown(
    tmp_path: Path, steps: list[doctor.Step], monkeypatch: pytest.MonkeyPatch
) -> None:
    steps.append(_step(OK))
    conf = _conf(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    res = _invoke(conf, "check")
    assert res.exit_code == 3
    assert res.output.startswith("VMBATCH UNKNOWN - run as root")


def test_a_configuration_that_does_not_load_is_unknown(tmp_path: Path) -> None:
    res = _invoke(_conf(tmp_path, "[health]\ntimeout = -1\n"), "check")
    assert res.exit_code == 3
    (line,) = res.output.splitlines()
    assert line.startswith("VMBATCH UNKNOWN - configuration: ")
    assert line.endswith("[health].timeout: must be > 0 and at most 300 seconds, got -1.0")


def test_help_says_the_exit_statuses() -> None:
    res = CliRunner().invoke(cli.cli, ["check", "--help"])
    assert res.exit_code == 0
    for text in ("0 OK", "1 WARNING", "2 CRITICAL", "3 UNKNOWN", "--take-out", "--timeout"):
        assert text in " ".join(res.output.split())


# -- --take-out ----------------------------------------------------------------------------


class FakeScheduler:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
        self.calls: list[tuple[str, ...]] = []
        (tmp_path / "bin").mkdir(exist_ok=True)
        if kind == "slurm":
            (tmp_path / "bin" / "scontrol").write_text("")
            monkeypatch.setattr(slurm, "config_present", lambda env: True)
        elif kind == "torque":
            (tmp_path / "bin" / "pbsnodes").write_text("")
        monkeypatch.setattr(slurm, "drain", self.drain)
        monkeypatch.setattr(torque, "offline", self.offline)
        monkeypatch.setattr(slurm, "drained_by", lambda cfg, node, reason, env: True)
        monkeypatch.setattr(slurm, "resume", lambda cfg, node, env: self.calls.append(("resume",)))
        self.node_failing: list[Check] = []
        monkeypatch.setattr(check, "node_checks", lambda cfg: self.node_failing)

    def drain(self, cfg: Any, node: str, reason: str, env: Any) -> str:
        self.calls.append(("drain", node, reason))
        return reason

    def offline(self, cfg: Any, note: str) -> bool:
        self.calls.append(("offline", note))
        return True


def test_take_out_drains_on_critical_and_resumes_once_ok(
    tmp_path: Path, steps: list[doctor.Step], monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = FakeScheduler(tmp_path, monkeypatch, "slurm")
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    conf = _conf(tmp_path)
    steps.append(_step(CRIT))
    res = _invoke(conf, "check", "--take-out")
    assert res.exit_code == 2
    reason = "vmbatch check: free space: only 1.0 GiB / free"
    assert sched.calls == [("drain", "node7", reason)]
    cfg = config.load(conf)
    mark = policy.read_mark(cfg)
    assert mark is not None and (mark.node, mark.reason) == ("node7", reason)
    steps[:] = [_step(WARN)]
    sched.node_failing = [Check(False, "resource limits", "no memory cgroup")]
    res = _invoke(conf, "check", "--take-out")
    assert res.exit_code == 1
    assert "stays out of service" in res.output and "resource limits" in res.output
    assert policy.read_mark(cfg) is not None, "doctor's node checks must pass first"
    sched.node_failing = []
    res = _invoke(conf, "check", "--take-out")
    assert res.exit_code == 1
    assert sched.calls[-1] == ("resume",)
    assert policy.read_mark(cfg) is None


def test_take_out_on_torque_sets_the_node_offline(
    tmp_path: Path, steps: list[doctor.Step], monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = FakeScheduler(tmp_path, monkeypatch, "torque")
    steps.append(_step(CRIT))
    res = _invoke(_conf(tmp_path), "check", "--take-out")
    assert res.exit_code == 2
    assert sched.calls == [("offline", "vmbatch check: free space: only 1.0 GiB / free")]


def test_take_out_without_a_scheduler_says_so(
    tmp_path: Path, steps: list[doctor.Step], monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeScheduler(tmp_path, monkeypatch, "none")
    steps.append(_step(CRIT))
    res = CliRunner().invoke(cli.cli, ["-c", str(_conf(tmp_path)), "check", "--take-out"])
    assert res.exit_code == 2
    assert "no scheduler client here to take the node out with" in res.output


def test_without_take_out_nothing_is_drained(
    tmp_path: Path, steps: list[doctor.Step], monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = FakeScheduler(tmp_path, monkeypatch, "slurm")
    steps.append(_step(CRIT))
    assert _invoke(_conf(tmp_path), "check").exit_code == 2
    assert sched.calls == []


# -- doctor --json ---------------------------------------------------------------------


def test_doctor_json_lists_every_check_with_its_severity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "run_checks", lambda cfg, reprobe=False: [OK, WARN])
    res = _invoke(_conf(tmp_path), "doctor", "--json")
    assert res.exit_code == 69
    doc = json.loads(res.output)
    assert doc["ok"] is False and doc["status"] == "warning"
    assert doc["checks"] == [
        {"ok": True, "severity": "ok", "what": "libvirtd", "detail": "libvirt 9.0.0", "fix": ""},
        {
            "ok": False,
            "severity": "warning",
            "what": "orphans",
            "detail": "2 leftover(s)",
            "fix": "run `vmbatch cleanup --stale`",
        },
    ]
    monkeypatch.setattr(doctor, "run_checks", lambda cfg, reprobe=False: [OK])
    res = _invoke(_conf(tmp_path), "doctor", "--json")
    assert res.exit_code == 0
    assert json.loads(res.output)["status"] == "ok"


def test_doctor_lines_mark_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "run_checks", lambda cfg, reprobe=False: [OK, WARN, CRIT])
    res = _invoke(_conf(tmp_path), "doctor")
    assert res.exit_code == 69
    assert res.output.splitlines() == [
        "ok   libvirtd: libvirt 9.0.0",
        "WARN orphans: 2 leftover(s)",
        "     fix: run `vmbatch cleanup --stale`",
        "FAIL free space: only 1.0 GiB | free",
        "     fix: free space",
    ]


def test_doctor_json_of_a_broken_configuration(tmp_path: Path) -> None:
    res = _invoke(_conf(tmp_path, "[health]\ntimeout = 0\n"), "doctor", "--json")
    assert res.exit_code == 69
    doc = json.loads(res.output)
    assert doc["status"] == "critical"
    assert doc["checks"][0]["what"] == "configuration"
    assert "[health].timeout" in doc["checks"][0]["detail"]


# -- the checks doctor gained ------------------------------------------------------------


def _cfg(tmp_path: Path, **sections: Any) -> config.Config:
    data: dict[str, Any] = {
        "paths": {"job_dir": str(tmp_path / "jobs"), "cache_dir": str(tmp_path / "cache")},
        "batch": {
            "state_dir": str(tmp_path / "state"),
            "user_dir": str(tmp_path / "users"),
            "accounting_log": str(tmp_path / "log" / "acct.jsonl"),
        },
        "tools": {
            "scontrol": str(tmp_path / "bin" / "scontrol"),
            "squeue": str(tmp_path / "bin" / "squeue"),
            "pbsnodes": str(tmp_path / "bin" / "pbsnodes"),
        },
        "libvirt": {"uri": "test:///default"},
        "vm": {"accel": "tcg"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config.parse(data)


def _tool(tmp_path: Path, name: str, mode: int = 0o755) -> None:
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / name).write_text("#!/bin/sh\n")
    (tmp_path / "bin" / name).chmod(mode)


def test_scheduler_clients(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    none = doctor._scheduler_tools(cfg)
    assert (none.ok, none.severity) == (False, Severity.CRITICAL)
    assert "neither Slurm's" in none.detail
    _tool(tmp_path, "pbsnodes")
    assert doctor._scheduler_tools(cfg).detail == f"Torque: {tmp_path}/bin/pbsnodes"
    _tool(tmp_path, "scontrol")
    half = doctor._scheduler_tools(cfg)
    assert not half.ok and f"squeue ({tmp_path}/bin/squeue) missing" in half.detail
    _tool(tmp_path, "squeue", 0o644)
    assert not doctor._scheduler_tools(cfg).ok, "not executable"
    _tool(tmp_path, "squeue")
    assert doctor._scheduler_tools(cfg).ok


def test_paths_root_writes_must_be_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path)
    checks = doctor._state_paths(cfg)
    assert [c.what for c in checks] == ["state directory", "user directory", "accounting log"]
    assert all(c.ok for c in checks)
    assert checks[2].detail == (
        f"{tmp_path}/log/acct.jsonl writable (will be created in {tmp_path})"
    )
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if str(p) == str(tmp_path) else real_access(p, m)
    )
    bad = doctor._state_paths(cfg)
    assert not bad[0].ok and bad[0].detail == f"{tmp_path} is not writable (uid {os.geteuid()})"

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly())
    ro = doctor._writable("state directory", tmp_path / "state")
    assert not ro.ok and ro.detail.endswith("is on a read-only file system")


def test_the_cache_over_its_cap_is_a_warning(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, cache={"max_size_gib": 1e-6})  # ~1 KiB
    images = tmp_path / "cache" / "images"
    images.mkdir(parents=True)
    (images / "a-0123456789abcdef.img").write_bytes(b"x" * 512)
    under = doctor._cache_size(cfg)
    assert under.ok and under.perf == ("cache=512B;1073;;0;1073",)
    (images / "b-0123456789abcdef.img").write_bytes(b"x" * 1024)
    over = doctor._cache_size(cfg)
    assert (over.ok, over.severity) == (False, Severity.WARNING)
    assert "over the cap (0 in use by jobs)" in over.detail
    nocap = doctor._cache_size(_cfg(tmp_path, cache={"max_size_gib": 0}))
    assert nocap.ok and "no cap" in nocap.detail


def test_orphans_are_what_the_reaper_would_remove_without_asking_the_scheduler(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path)
    assert doctor._orphans(cfg).detail == "none"
    stale = tmp_path / "users" / "31"
    stale.mkdir(parents=True)
    os.utime(stale, (1.0, 1.0))
    found = doctor._orphans(cfg)
    assert (found.ok, found.severity, found.perf) == (False, Severity.WARNING, ("orphans=1;0;;0",))
    assert found.detail.startswith("1 leftover(s) of jobs that no longer run: job 31: would ")
    assert stale.exists(), "a dry run"
    assert not StateStore(cfg.batch.state_dir).records()


def test_the_default_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert doctor._default_image(_cfg(tmp_path)).ok
    cfg = _cfg(
        tmp_path,
        batch={"default_image": "d", "user_images": ["u"]},
        images={"d": {"source": str(tmp_path / "nope.qcow2")}, "u": {"source": "/nope"}},
    )
    missing = doctor._default_image(cfg)
    assert (missing.ok, missing.severity) == (False, Severity.CRITICAL)
    assert "file not found" in missing.detail
    other = doctor._image(cfg, "u")
    assert (other.ok, other.severity) == (False, Severity.WARNING)


def test_the_metrics_file_check(tmp_path: Path) -> None:
    off = doctor._metrics_file(_cfg(tmp_path, metrics={"textfile": ""}))
    assert off.ok and off.detail == 'off ([metrics].textfile = "")'
    absent = doctor._metrics_file(_cfg(tmp_path, metrics={"textfile": f"{tmp_path}/x/v.prom"}))
    assert absent.ok and absent.detail.startswith(f"not written: {tmp_path}/x does not exist")
    here = doctor._metrics_file(_cfg(tmp_path, metrics={"textfile": f"{tmp_path}/v.prom"}))
    assert here.ok and here.detail == f"{tmp_path}/v.prom"


def test_the_log_target_check(tmp_path: Path) -> None:
    """An unreachable journal/syslog is a warning (the hooks then log to stderr); a socket
    that listens is fine."""
    missing = {"syslog_socket": f"{tmp_path}/no-log", "journal_socket": f"{tmp_path}/no-j"}
    gone = doctor._log_target(_cfg(tmp_path, log={"target": "journald", **missing}))
    assert (gone.ok, gone.severity) == (False, Severity.WARNING)
    assert gone.detail.endswith("logging to stderr") and f"{tmp_path}/no-j" in gone.detail
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(f"{tmp_path}/log")
    try:
        here = doctor._log_target(
            _cfg(tmp_path, log={"target": "syslog", "syslog_socket": f"{tmp_path}/log"})
        )
    finally:
        listener.close()
    assert here.ok and here.detail == f"syslog at {tmp_path}/log"
    plain = doctor._log_target(_cfg(tmp_path, log={"target": "stderr"}))
    assert plain.ok and plain.detail == "stderr (the hooks' stderr)"


def test_the_health_checks_run_against_libvirt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real list (test driver for libvirt; QEMU's tools stubbed: no process here)."""
    ran: list[str] = []

    def tool(label: str, path: Path, cfg: config.Config, fix: str = "") -> Check:
        ran.append(label)
        return Check(True, label, str(path))

    monkeypatch.setattr(doctor, "_tool", tool)
    _tool(tmp_path, "pbsnodes")
    cfg = _cfg(tmp_path, health={"libvirt_timeout": 3})
    (tmp_path / "jobs").mkdir()
    (tmp_path / "cache").mkdir()
    result = check.run(cfg, doctor.health_checks(cfg))
    # pytest's base directory is 0700: QEMU's user could not reach files there, and the
    # directory check says so; no node agent runs here (a warning); nothing else fails.
    failed = {(c.what, "not traversable" in c.detail) for c in result.checks if not c.ok}
    assert failed <= {("job directory", True), ("cache directory", True), ("node agent", False)}
    (agent_check,) = [c for c in result.checks if c.what == "node agent"]
    assert agent_check.status == Severity.WARNING
    assert "a job the scheduler suspends keeps its VM running" in agent_check.detail
    assert ran == ["qemu-img", "qemu-system"]
    names = [c.what for c in result.checks]
    assert names[:2] == ["libvirtd", "libvirtd restarts"]
    for name in ("accelerator", "free space", "image cache", "default image", "orphans"):
        assert name in names
    line = check.status_line(result, 20)
    assert f"| checks={len(names)};;;0" in line
    assert "orphans=0;0;;0" in line and "job_dir_free=" in line


def test_the_libvirt_probe_uses_the_short_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float] = []
    real: Callable[[config.Config], Check] = doctor._libvirt

    def spy(cfg: config.Config) -> Check:
        seen.append(cfg.libvirt.timeout)
        return real(cfg)

    monkeypatch.setattr(doctor, "_libvirt", spy)
    cfg = _cfg(tmp_path, health={"libvirt_timeout": 3})
    steps = dict(doctor.health_checks(cfg))
    assert steps["libvirtd"]()[0].ok
    assert seen == [3.0]
