"""Accelerator choice, signals, retry policies, job directories, exit codes."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from pathlib import Path

import pytest
import tenacity

from vmbatch import accel, config, retry, signals, state
from vmbatch.errors import (
    AcceleratorError,
    ConfigError,
    Disposition,
    HostError,
    JobInterruptedError,
    VmBatchError,
)
from vmbatch.hooks import exitcodes
from vmbatch.state import JobDir, safe_job_id


def test_probe_firmware_reset_vector() -> None:
    rom = accel.probe_firmware()
    assert len(rom) == 65536
    # mov al,0x2a ; out 0xf4,al at the reset vector (last 16 bytes of the BIOS)
    assert rom[0xFFF0:0xFFF4] == bytes([0xB0, 0x2A, 0xE6, 0xF4])


def test_configured_accelerators_need_no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    tcg = accel.choose(config.parse({"vm": {"accel": "tcg"}}))
    assert tcg.accel == "tcg" and tcg.domain_type == "qemu" and "configured" in tcg.reason
    monkeypatch.setattr(accel, "KVM_DEVICE", Path("/nonexistent/kvm"))
    with pytest.raises(AcceleratorError, match="/nonexistent/kvm is missing"):
        accel.choose(config.parse({"vm": {"accel": "kvm"}}))


def test_auto_uses_the_cache_of_this_boot_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "accel.json"
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(accel, "CACHE_FILE", cache)
    monkeypatch.setattr(state, "BOOT_ID", boot)
    monkeypatch.setattr(accel, "KVM_DEVICE", Path("/nonexistent/kvm"))
    cfg = config.parse({})
    first = accel.choose(cfg)  # no /dev/kvm: decided without starting QEMU
    assert first.accel == "tcg" and "does not exist" in first.reason
    assert json.loads(cache.read_text())["boot_id"] == "boot-1"
    cache.write_text(json.dumps({"boot_id": "boot-1", "accel": "kvm", "reason": "probe ok"}))
    assert accel.choose(cfg) == accel.AccelChoice("kvm", "probe ok (cached this boot)")
    boot.write_text("boot-2\n")  # rebooted: probe again
    assert accel.choose(cfg).accel == "tcg"


def test_deferred_holds_signals_until_the_section_ends() -> None:
    with signals.interruptible():
        with pytest.raises(JobInterruptedError) as info:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                reached = True
        assert reached
        assert info.value.signum == signal.SIGTERM
        with pytest.raises(JobInterruptedError, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 1)  # give the handler a chance to run
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_signal_blocks_in_another_thread_leave_the_handlers_alone() -> None:
    """Only the main thread may set handlers: a job run in another thread (tests run several
    at once) runs its block and leaves the process's handlers as they were."""
    before = signal.getsignal(signal.SIGTERM)
    ran: list[object] = []

    def job() -> None:
        with signals.interruptible(), signals.forwarded([signal.SIGTERM]) as pending:
            ran.append(signal.getsignal(signal.SIGTERM))
            ran.append(pending.take())

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(timeout=10)
    assert ran == [before, []]
    assert signal.getsignal(signal.SIGTERM) is before


def test_every_retry_policy_is_bounded_and_reraises() -> None:
    for policy in retry.ALL_POLICIES:
        r = policy.retrying()
        assert r.reraise, policy.name
        assert policy.max_attempts is not None or policy.max_delay is not None, policy.name
        assert policy.name.endswith("Policy")


def test_policy_reraises_our_error_after_its_attempts() -> None:
    calls = []
    policy = retry.RetryPolicy("TestPolicy", (HostError,), 0.0, max_attempts=3)
    with pytest.raises(HostError, match="try 3"):
        for attempt in policy.retrying():
            with attempt:
                calls.append(1)
                raise HostError(f"try {len(calls)}")
    assert len(calls) == 3
    unbounded = retry.RetryPolicy("BadPolicy", (HostError,), 0.0)
    with pytest.raises(ValueError, match="no stop condition"):
        unbounded.retrying()
    assert isinstance(retry.SSH_READY_POLICY.retrying(max_delay=1).stop, tenacity.stop.stop_base)


def test_job_dir_modes_atomic_write_and_removal(tmp_path: Path) -> None:
    jd = JobDir(tmp_path / "jobs", "12.server/x").create()
    assert jd.path.name == "12.server_x"
    assert stat.S_IMODE(jd.path.stat().st_mode) == 0o711
    assert stat.S_IMODE(jd.keys.stat().st_mode) == 0o700
    jd.write(jd.seed, b"abc", mode=0o640)
    assert jd.seed.read_bytes() == b"abc" and stat.S_IMODE(jd.seed.stat().st_mode) == 0o640
    assert not list(jd.path.glob(".*.tmp"))
    with pytest.raises(HostError, match="already exists"):
        JobDir(tmp_path / "jobs", "12.server/x").create()
    with pytest.raises(ValueError):
        jd.write(tmp_path / "elsewhere", b"")
    jd.remove()
    jd.remove()
    assert not jd.path.exists()
    assert safe_job_id("../..") == "_.." and safe_job_id("") == "job"


def test_every_disposition_has_an_exit_code() -> None:
    for table in (exitcodes.CLI, exitcodes.TORQUE_PROLOGUE, exitcodes.SLURM_PROLOG):
        assert set(table) == set(Disposition)
    assert exitcodes.CLI_INTERNAL_ERROR not in exitcodes.CLI.values()
    assert 0 not in exitcodes.CLI.values()
    # Torque: 1 would abort the job without delivering its .o/.e (the user never sees why);
    # node problems must requeue (neither 0 nor 1). Slurm: only node problems drain.
    assert 1 not in exitcodes.TORQUE_PROLOGUE.values()
    assert exitcodes.TORQUE_PROLOGUE[Disposition.REQUEUE] not in (0, 1)
    assert exitcodes.SLURM_PROLOG[Disposition.ABORT_JOB] == 0


def test_error_messages_carry_hints() -> None:
    err = VmBatchError("it broke", hint="do this")
    assert str(err) == "it broke (do this)"
    multi = ConfigError(["a", "b"], source="/etc/x.toml")
    assert str(multi) == "/etc/x.toml: 2 problems: a; b"


def test_disk_budget_counts_what_was_written_not_the_sparse_size(tmp_path: Path) -> None:
    from vmbatch.config import parse
    from vmbatch.errors import DiskBudgetError
    from vmbatch.images.disks import DiskBudget
    from vmbatch.state import JobDir

    jobdir = JobDir(tmp_path, "5")
    jobdir.path.mkdir()
    cfg = parse({"disks": {"job_max_gib": 1 / 1024}})  # 1 MiB
    budget = DiskBudget(cfg, jobdir)
    with jobdir.scratch.open("wb") as fh:
        fh.truncate(10 * 2**30)  # a 10 GiB sparse disk costs nothing yet
    budget()
    jobdir.overlay.write_bytes(b"x" * 2 * 2**20)
    with pytest.raises(DiskBudgetError, match=r"more than the 0\.000976562 GiB"):
        budget()
    DiskBudget(parse({"disks": {"job_max_gib": 0}}), jobdir)()  # 0: no limit


def test_process_identity_tells_a_reused_pid_apart() -> None:
    me = state.process_identity(os.getpid())
    assert me is not None and state.is_alive(me)
    pid, start, boot = me.split(":")
    assert not state.is_alive(f"{pid}:{int(start) + 1}:{boot}")  # same PID, later process
    assert not state.is_alive(f"{pid}:{start}:another-boot")
    assert not state.is_alive("") and not state.is_alive("x:1:2")


def test_doctor_says_when_srun_steps_would_run_outside_the_vm() -> None:
    from vmbatch import doctor

    bad = doctor._slurm_steps({"CliFilterPlugins": "(null)", "TaskProlog": "(null)"})
    assert not bad.ok and "run on the node, outside the job's VM" in bad.detail
    good = doctor._slurm_steps({"CliFilterPlugins": "lua", "TaskProlog": "/x/taskprolog"})
    assert good.ok and good.detail == "CliFilterPlugins=lua, TaskProlog=/x/taskprolog"
