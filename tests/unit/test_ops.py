"""The operator's commands (``vmbatch ps``, ``logs``, ``ssh``, ``console``) through click's
test runner, against libvirt's test driver (a node file holding the job's domain) and
files in a temporary site. Real VMs: tests/system/test_ops.py."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest
from click.testing import CliRunner

from vmbatch import cli, config, logsetup, ops, pausing
from vmbatch.errors import GuestConnectionError
from vmbatch.hooks.jobstate import KEPT, READY, Record, StateStore, UserDir
from vmbatch.libvirt import connection
from vmbatch.libvirt.domain import DiskSpec, DomainSpec, JobMetadata, build_xml, domain_name
from vmbatch.state import JobDir

TORQUE_ID = "123[45].torque-server.example.org"


def vmbatch(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """``vmbatch ARGS`` in click's test runner, through :func:`cli.main` (where errors
    become exit codes); (status, stdout, stderr)."""
    runner = CliRunner()
    with runner.isolation(input=stdin) as (out, err, _):
        code = cli.main(list(args))
    return code, out.getvalue().decode(), err.getvalue().decode()


def domain_xml(job_id: str, user: str, job_dir: Path, domain_type: str = "qemu") -> str:
    jd = job_dir / job_id
    spec = DomainSpec(
        name=domain_name(job_id),
        domain_type=domain_type,  # type: ignore[arg-type]
        memory_mib=512,
        vcpus=2,
        machine="q35",
        disks=(DiskSpec(jd / "overlay.qcow2", "qcow2"),),
        console_log=jd / "console.log",
        metadata=JobMetadata(job_id, user, "torque", "demo", "0.1.0"),
        emulator=Path("/usr/bin/qemu-system-x86_64"),
    )
    return build_xml(spec)


class Site:
    def __init__(self, root: Path, domains: list[str]) -> None:
        self.root = root
        self.job_dir = root / "jobs"
        self.state_dir = root / "state"
        self.user_dir = root / "run"
        self.console_dir = root / "console"
        node = root / "node.xml"
        node.write_text(
            "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>2</active><nodes>1</nodes>"
            "<sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>"
            "<memory>8388608</memory>" + "".join(domains) + "</node>"
        )
        self.config = root / "vmbatch.toml"
        self.config.write_text(
            f"""
[libvirt]
uri = "test://{node}"
[paths]
job_dir = "{self.job_dir}"
console_log_dir = "{self.console_dir}"
[batch]
state_dir = "{self.state_dir}"
user_dir = "{self.user_dir}"
"""
        )

    def vmbatch(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        return vmbatch("-c", str(self.config), *args, stdin=stdin)

    def record(self, job_id: str, **kw: Any) -> Record:
        rec = Record(job_id=job_id, scheduler="torque", user="alice", image="demo", **kw)
        return StateStore(self.state_dir).write(rec)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path, [domain_xml(TORQUE_ID, "alice", tmp_path / "jobs")])


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command runs as uid 4711 ("bob"), not root."""
    monkeypatch.setattr(os, "geteuid", lambda: 4711)
    monkeypatch.setattr(ops, "_me", lambda: "bob")
    monkeypatch.setattr(connection, "_user_name", lambda: "bob")


# -- ps ------------------------------------------------------------------------------------


def test_ps_lists_the_job_with_its_record_in_columns_as_wide_as_a_torque_id(
    site: Site,
) -> None:
    site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY, started=time.time() - 75)
    code, out, err = site.vmbatch("ps")
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == [
        "JOB", "USER", "IMAGE", "STATE", "PHASE", "AGE", "CPUS", "MEM", "SSH", "ACCEL",
    ]  # fmt: skip
    assert row.split() == [TORQUE_ID, "alice", "demo", "running", "ready", "1m15s", "2",
                           "512M", "-", "tcg"]  # fmt: skip
    # The job id is not cut and every column starts where its header does.
    assert header.index("USER") == row.index("alice") == len(TORQUE_ID) + 2


def test_ps_json_has_every_key_for_every_row(site: Site) -> None:
    site.record("77", phase=KEPT, kept_as="disks", kept_until=time.time() + 600, started=1.0)
    code, out, _ = site.vmbatch("ps", "--json")
    assert code == 0
    rows = json.loads(out)
    keys = {
        "job_id", "user", "scheduler", "image", "domain", "state", "phase", "started",
        "age_seconds", "vcpus", "memory_mib", "ssh_port", "accelerator", "kept_as",
        "kept_until", "pauses", "migrated_to",
    }  # fmt: skip
    assert [set(r) for r in rows] == [keys, keys]
    by_id = {r["job_id"]: r for r in rows}
    assert by_id[TORQUE_ID]["user"] == "alice"
    assert by_id[TORQUE_ID]["state"] == "running"
    assert by_id[TORQUE_ID]["accelerator"] == "tcg"
    assert by_id[TORQUE_ID]["phase"] is None  # no record for it
    # A job kept as disks has no domain, but ps shows it.
    assert by_id["77"]["state"] is None
    assert by_id["77"]["phase"] == "kept"
    assert by_id["77"]["kept_as"] == "disks"


def test_ps_shows_time_left_for_a_kept_job(site: Site) -> None:
    site.record("77", phase=KEPT, kept_as="paused", kept_until=time.time() + 3000, started=1.0)
    _, out, _ = site.vmbatch("ps")
    assert "kept:paused (49m" in out


def test_ps_reads_the_accelerator_from_the_domain_type(tmp_path: Path) -> None:
    s = Site(tmp_path, [domain_xml("5", "carol", tmp_path / "jobs", domain_type="kvm")])
    _, out, _ = s.vmbatch("ps", "--json")
    assert json.loads(out)[0]["accelerator"] == "kvm"


def test_ps_as_a_user_is_read_only_and_without_phase(
    site: Site, as_user: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real = libvirt.openReadOnly

    def read_only(uri: str) -> Any:
        opened.append(uri)
        return real(uri)

    monkeypatch.setattr(libvirt, "openReadOnly", read_only)
    monkeypatch.setattr(libvirt, "open", lambda uri: pytest.fail("a read-write connection"))
    site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY, started=time.time())
    code, out, _err = site.vmbatch("ps", "--json")
    assert code == 0
    assert len(opened) == 1
    assert json.loads(out)[0]["phase"] is None
    assert "root's to see" in site.vmbatch("ps")[2]


def test_ps_as_a_user_refused_by_the_socket_says_what_to_do_at_once(
    site: Site, as_user: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sock = tmp_path / "libvirt-sock-ro"
    sock.touch()
    monkeypatch.setattr(connection, "SYSTEM_SOCKETS", (str(sock),))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != str(sock) and real_access(p, mode))
    attempts: list[str] = []

    def refuse(uri: str) -> Any:
        attempts.append(uri)
        raise libvirt.libvirtError("Failed to connect socket: Permission denied")

    monkeypatch.setattr(libvirt, "openReadOnly", refuse)
    text = site.config.read_text().splitlines()
    site.config.write_text(
        "\n".join('uri = "qemu:///system"' if t.startswith("uri") else t for t in text)
    )
    code, _out, err = site.vmbatch("ps")
    assert code == 65
    assert attempts == ["qemu:///system"]  # no retries
    assert f"user bob may not use libvirt at qemu:///system: {sock} is not open to bob" in err
    assert "run the command as root" in err
    assert "org.libvirt.unix.monitor" in err
    assert "is libvirtd running" not in err


def test_a_user_denied_by_polkit_is_told_so(
    site: Site, as_user: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "denied", lambda exc: True)
    attempts: list[str] = []

    def refuse(uri: str) -> Any:
        attempts.append(uri)
        raise libvirt.libvirtError("authentication unavailable: no polkit agent available")

    monkeypatch.setattr(libvirt, "openReadOnly", refuse)
    code, _, err = site.vmbatch("ps")
    assert code == 65
    assert len(attempts) == 1
    assert "user bob may not use libvirt" in err and "no polkit agent" in err


def test_ps_table_widths_follow_the_longest_value() -> None:
    rows = [
        ops.PsRow("1", "a", "torque", "img", "vmbatch-1", "running", "ready", 0.0, 5.0, 1,
                  256, 40001, "tcg", None, None),
        ops.PsRow(TORQUE_ID, "bob", "torque", "img", None, None, "kept", 0.0, 4000.0, None,
                  None, None, None, "disks", 100.0),
    ]  # fmt: skip
    lines = ops.ps_table(rows, now=0.0)
    starts = {line.index(" a ") if " a " in line else line.index(" bob") for line in lines[1:]}
    assert len(starts) == 1
    assert "kept:disks (1m40s left)" in lines[2]
    assert "1h06m" in lines[2]


# -- logs ----------------------------------------------------------------------------------


def _job_files(site: Site, job_id: str) -> JobDir:
    jd = JobDir(site.job_dir, job_id)
    jd.path.mkdir(parents=True)
    jd.console_log.write_bytes(b"".join(b"boot line %d\r\n" % i for i in range(10)))
    jd.log.write_text("vmbatch-prologue: INFO: VM ready\n")
    return jd


def test_logs_labels_the_console_and_vmbatch_lines(site: Site) -> None:
    _job_files(site, "42")
    code, out, _ = site.vmbatch("logs", "42", "--lines", "2")
    assert code == 0
    assert out.splitlines() == [
        "[console] boot line 8",
        "[console] boot line 9",
        "[vmbatch] vmbatch-prologue: INFO: VM ready",
    ]


def test_logs_without_vmbatch_log_shows_the_console(site: Site) -> None:
    jd = _job_files(site, "42")
    jd.log.unlink()
    code, out, _ = site.vmbatch("logs", "42", "-n", "1")
    assert code == 0
    assert out.splitlines() == ["[console] boot line 9", "[vmbatch] (no vmbatch.log yet)"]


def test_logs_of_a_gone_job_use_the_kept_console_copy(site: Site) -> None:
    site.console_dir.mkdir()
    (site.console_dir / "42.log").write_text("last words\n")
    code, out, _ = site.vmbatch("logs", "42")
    assert (code, out) == (0, "[console] last words\n")


def test_logs_of_an_unknown_job(site: Site) -> None:
    code, _, err = site.vmbatch("logs", "9999")
    assert code == 65
    assert "no job 9999 on this node" in err


def test_logs_refuse_a_bad_job_id(site: Site) -> None:
    code, _, err = site.vmbatch("logs", "../etc")
    assert code == 65
    assert "has characters vmbatch does not accept" in err


def test_logs_are_roots(site: Site, as_user: None) -> None:
    _job_files(site, "42")
    code, out, err = site.vmbatch("logs", "42")
    assert code == 65
    assert out == ""
    assert "the logs of job 42 are root's" in err
    assert "vmbatch ssh 42 -- dmesg" in err


def test_logs_follow_prints_new_lines_until_the_job_directory_goes(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    jd = _job_files(site, "42")
    polls: list[float] = []

    def poll(seconds: float) -> None:  # each poll changes the files, then the job ends
        polls.append(seconds)
        if len(polls) == 1:
            with jd.console_log.open("ab") as fh:
                fh.write(b"new console line\r\npartial")
            with jd.log.open("a") as fh:
                fh.write("vmbatch-epilogue: INFO: VM destroyed\n")
        elif len(polls) == 2:
            with jd.console_log.open("ab") as fh:
                fh.write(b" end\n")
        else:
            for f in jd.path.iterdir():
                f.unlink()
            jd.path.rmdir()

    monkeypatch.setattr(time, "sleep", poll)
    code, out, _ = site.vmbatch("logs", "42", "--follow", "--lines", "0")
    assert code == 0
    assert out.splitlines() == [
        "[console] new console line",
        "[vmbatch] vmbatch-epilogue: INFO: VM destroyed",
        "[console] partial end",
        "[vmbatch] job 42: its VM is gone (job directory removed)",
    ]
    assert len(polls) == 3


def test_logs_show_what_the_guest_printed_without_its_control_characters(site: Site) -> None:
    """The console is the guest's: an escape sequence in it (here OSC 52, a clipboard write,
    and a screen clear) must not reach root's terminal as one."""
    jd = _job_files(site, "42")
    jd.console_log.write_bytes(b"evil \x1b]52;c;aGk=\x07\x1b[2J\xc2\x9b1m\tend\r\n")
    code, out, _ = site.vmbatch("logs", "42", "--lines", "1")
    assert code == 0
    assert out.splitlines()[0] == "[console] evil ^[]52;c;aGk=^G^[[2J\\x9b1m\tend"
    assert "\x1b" not in out


def test_logs_follow_ends_when_the_job_is_kept(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept job keeps its directory for [batch].keep_failed_for: following its logs ends
    when the epilogue keeps it, not an hour later."""
    _job_files(site, "42")
    polls: list[float] = []

    def poll(seconds: float) -> None:
        polls.append(seconds)
        site.record("42", phase=KEPT)

    monkeypatch.setattr(time, "sleep", poll)
    code, out, _ = site.vmbatch("logs", "42", "--follow", "--lines", "0")
    assert code == 0 and len(polls) == 1
    assert out.splitlines()[-1] == (
        "[vmbatch] job 42: ended; its VM is kept for inspection (`vmbatch ps`)"
    )


def test_a_reader_that_goes_away_is_not_an_error(
    site: Site, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vmbatch logs -f JOB | head`: head exits, the next write fails with EPIPE; click
    ends the command quietly with status 1, never as vmbatch's internal error (70)."""

    def closed(*_args: object, **_kw: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(ops, "show_logs", closed)
    with pytest.raises(SystemExit) as ended:
        cli.main(["-c", str(site.config), "logs", "42"])
    assert ended.value.code == 1
    assert "internal error" not in capsys.readouterr().err


def test_logs_follow_starts_over_after_a_rollover(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"fresh\n")
    import io

    out = io.StringIO()
    offset, rest = ops._new_lines(log, 1000, b"", "console", out)
    assert (offset, rest, out.getvalue()) == (6, b"", "[console] fresh\n")


# -- ssh -----------------------------------------------------------------------------------


def _user_dir(site: Site, job_id: str, owner: int, files: dict[str, bytes]) -> Path:
    d = site.user_dir / job_id
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    os.chown(d, owner, owner)
    return d


def test_ssh_refuses_another_user_naming_the_owner(site: Site, as_user: None) -> None:
    _user_dir(site, "42", 0, {"guest.json": b"{}", "id_ed25519": b"k"})
    code, _, err = site.vmbatch("ssh", "42", "--", "true")
    assert code == 65
    assert "job 42 belongs to root: only root (and root) may log in to its VM" in err


def test_ssh_of_a_job_without_a_vm_here(site: Site, as_user: None) -> None:
    code, _, err = site.vmbatch("ssh", "42")
    assert code == 65
    assert "no VM of job 42 on this node" in err


def test_ssh_tells_the_owner_why_the_prologue_made_no_vm(
    site: Site, as_user: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _user_dir(site, "42", 4711, {"error": b"image 'x' is not offered on this site\n"})
    monkeypatch.setattr(ops, "_owner", lambda path: "bob")
    code, _, err = site.vmbatch("ssh", "42")
    assert code == 65
    assert "job 42 has no VM: image 'x' is not offered on this site" in err


def test_ssh_not_ready_yet(site: Site, as_user: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_dir(site, "42", 4711, {})
    monkeypatch.setattr(ops, "_owner", lambda path: "bob")
    code, _, err = site.vmbatch("ssh", "42")
    assert code == 65
    assert "not ready yet" in err


def test_ssh_owner_logs_in_with_the_job_key_and_gets_the_commands_status(
    site: Site, as_user: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = {"host": "127.0.0.1", "port": 40123, "user": "bob", "host_key": "ssh-ed25519 AAAA"}
    _user_dir(site, "42", 4711, {"guest.json": json.dumps(info).encode(), "id_ed25519": b"KEY"})
    monkeypatch.setattr(ops, "_owner", lambda path: "bob")
    seen: list[Any] = []

    def run_ssh(endpoint: Any, argv: tuple[str, ...]) -> int:
        seen.append((endpoint, argv))
        return 7

    monkeypatch.setattr(ops, "run_ssh", run_ssh)
    code, _, _ = site.vmbatch("ssh", "42", "--", "ls", "-l", "--color")
    assert code == 7
    endpoint, argv = seen[0]
    assert argv == ("ls", "-l", "--color")
    assert (endpoint.port, endpoint.user, endpoint.client_key.private_openssh) == (
        40123, "bob", "KEY",
    )  # fmt: skip
    assert endpoint.host_key.public_openssh == "ssh-ed25519 AAAA"


def test_ssh_owner_of_a_vm_that_does_not_answer_hears_it_may_be_kept_paused(
    site: Site, as_user: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner cannot ask libvirt whether the VM is paused (kept for inspection): the
    error says that this may be why, and the key read for it is masked in any log."""
    info = {"host": "127.0.0.1", "port": 40123, "user": "bob", "host_key": "ssh-ed25519 AAAA"}
    _user_dir(
        site,
        "42",
        4711,
        {"guest.json": json.dumps(info).encode(), "id_ed25519": b"KEY7-0123456789abcdef"},
    )
    monkeypatch.setattr(ops, "_owner", lambda path: "bob")

    def silent(endpoint: Any, argv: tuple[str, ...]) -> int:
        raise GuestConnectionError("the guest did not answer within 10s")

    monkeypatch.setattr(ops, "run_ssh", silent)
    code, _, err = site.vmbatch("ssh", "42", "--", "true")
    assert code == 75
    assert "the guest did not answer" in err and "the VM is paused" in err
    assert logsetup.redact("key KEY7-0123456789abcdef here") == "key [redacted] here"


def test_ssh_root_option_is_roots(site: Site, as_user: None) -> None:
    code, _, err = site.vmbatch("ssh", "--root", "42")
    assert code == 65
    assert "only root may log in as root" in err


def _root_login_files(site: Site, job_id: str) -> JobDir:
    jd = JobDir(site.job_dir, job_id)
    jd.path.mkdir(parents=True)
    jd.keys.mkdir()
    info = {"host": "127.0.0.1", "port": 40999, "user": "alice", "host_key": "ssh-ed25519 B"}
    jd.login.write_text(json.dumps(info))
    jd.user_key.write_text("ALICEKEY")
    return jd


def test_ssh_as_root_uses_the_root_only_copy_not_the_users_directory(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    _root_login_files(site, TORQUE_ID)
    info = {"port": 1, "user": "mallory", "host_key": "x"}
    _user_dir(site, TORQUE_ID, 4711, {"guest.json": json.dumps(info).encode()})
    seen: list[Any] = []
    monkeypatch.setattr(ops, "run_ssh", lambda ep, argv: seen.append(ep) or 0)
    code, _, err = site.vmbatch("ssh", TORQUE_ID, "--", "id")
    assert code == 0, err
    assert (seen[0].port, seen[0].user, seen[0].client_key.private_openssh) == (
        40999, "alice", "ALICEKEY",
    )  # fmt: skip


def test_ssh_as_root_in_the_guest_needs_a_root_key(site: Site) -> None:
    _root_login_files(site, TORQUE_ID)
    code, _, err = site.vmbatch("ssh", "--root", TORQUE_ID)
    assert code == 65
    assert "has no login for root" in err and "[mounts]" in err


def test_ssh_as_root_in_the_guest_with_the_admin_key(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    jd = _root_login_files(site, TORQUE_ID)
    jd.admin_key.write_text("ROOTKEY")
    seen: list[Any] = []
    monkeypatch.setattr(ops, "run_ssh", lambda ep, argv: seen.append(ep) or 0)
    assert site.vmbatch("ssh", "--root", TORQUE_ID)[0] == 0
    assert (seen[0].user, seen[0].client_key.private_openssh) == ("root", "ROOTKEY")


def test_ssh_as_root_to_a_paused_vm_says_how_to_resume(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    _root_login_files(site, TORQUE_ID)
    site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=KEPT, kept_as="paused")
    monkeypatch.setattr(
        connection.Connection,
        "status",
        lambda self, name: connection.DomainStatus("paused", 2, 512),
    )
    code, _, err = site.vmbatch("ssh", TORQUE_ID)
    assert code == 65
    assert "is paused (kept for inspection)" in err
    assert f"resume {domain_name(TORQUE_ID)}" in err


def test_ssh_as_root_to_a_job_kept_as_disks(site: Site) -> None:
    site.record("42", phase=KEPT, kept_as="disks")
    code, _, err = site.vmbatch("ssh", "42")
    assert code == 65
    assert "kept as disks only" in err


def test_ssh_as_root_without_a_job_directory(site: Site) -> None:
    code, _, err = site.vmbatch("ssh", "4242")
    assert code == 65
    assert "no VM of job 4242 on this node" in err


class _Channel:
    """Just enough of a paramiko channel for :func:`ops.run_ssh` (no terminal)."""

    def __init__(self, out: bytes, err: bytes, status: int) -> None:
        self._r, self._w = os.pipe()
        os.write(self._w, b"x")  # always "readable" for select
        self.out, self.err, self.status = [out], [err], status
        self.command: str | None = None
        self.sent = b""
        self.closed = False

    def fileno(self) -> int:
        return self._r

    def exec_command(self, command: str) -> None:
        self.command = command

    def invoke_shell(self) -> None:
        self.command = "<shell>"

    def recv_ready(self) -> bool:
        return bool(self.out)

    def recv(self, n: int) -> bytes:
        return self.out.pop()

    def recv_stderr_ready(self) -> bool:
        return bool(self.err)

    def recv_stderr(self, n: int) -> bytes:
        return self.err.pop()

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def shutdown_write(self) -> None:
        pass

    def exit_status_ready(self) -> bool:
        return True

    def recv_exit_status(self) -> int:
        return self.status

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


class _Client:
    def __init__(self, chan: _Channel) -> None:
        self.chan = chan
        self.closed = False

    def get_transport(self) -> Any:
        chan = self.chan

        class T:
            def open_session(self) -> _Channel:
                return chan

            def is_active(self) -> bool:
                return True

        return T()

    def close(self) -> None:
        self.closed = True


def test_run_ssh_passes_output_apart_and_returns_the_status(tmp_path: Path) -> None:
    import io

    chan = _Channel(b"hello\n", b"oops\n", 3)
    client = _Client(chan)
    stdin = (tmp_path / "in").open("w+b")
    out, err = io.BytesIO(), io.BytesIO()
    ep = ops._endpoint(config.Config(), {"port": 1, "user": "u", "host_key": "k"}, b"key")
    status = ops.run_ssh(
        ep, ("echo", "a b"), stdin_fd=stdin.fileno(), out=out, err=err,
        connect=lambda _ep: client,  # type: ignore[arg-type,return-value]
    )  # fmt: skip
    assert status == 3
    assert (out.getvalue(), err.getvalue()) == (b"hello\n", b"oops\n")
    assert chan.command == "echo 'a b'\nexit $?"
    assert client.closed


# -- console -------------------------------------------------------------------------------


def test_console_is_roots(site: Site, as_user: None) -> None:
    code, _, err = site.vmbatch("console", "42")
    assert code == 65
    assert "only root may attach to a job VM's console" in err


def test_console_of_a_job_without_vm(site: Site) -> None:
    code, _, err = site.vmbatch("console", "4242")
    assert code == 65
    assert "no VM of job 4242 on this node" in err


class _Stream:
    def __init__(self) -> None:
        self.ended = threading.Event()
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True


def test_console_sends_keys_until_the_escape_character(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = _Stream()
    monkeypatch.setattr(
        connection.Connection, "open_console", lambda self, name, on_data, force: stream
    )
    r, w = os.pipe()
    os.write(w, b"ls\r\x1dignored")
    said: list[str] = []
    code = ops.console(config.load(site.config), TORQUE_ID, stdin_fd=r, say=said.append)
    os.close(r)
    os.close(w)
    assert code == 0
    assert stream.sent == [b"ls\r"]
    assert stream.closed
    assert "Escape character is ^] (Ctrl-])" in said[0]


def test_console_ends_when_the_vm_closes_it(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream()
    stream.ended.set()
    monkeypatch.setattr(
        connection.Connection, "open_console", lambda self, name, on_data, force: stream
    )
    r, w = os.pipe()
    said: list[str] = []
    ops.console(config.load(site.config), TORQUE_ID, stdin_fd=r, say=said.append)
    os.close(r)
    os.close(w)
    assert "closed" in said[-1]


def test_console_force_is_passed_on(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream()
    stream.ended.set()
    forced: list[bool] = []

    def open_console(self: Any, name: str, on_data: Any, force: bool) -> _Stream:
        forced.append(force)
        return stream

    monkeypatch.setattr(connection.Connection, "open_console", open_console)
    code, _, err = site.vmbatch("console", "--force", TORQUE_ID, stdin="")
    assert code == 0, err
    assert forced == [True]


def test_every_new_command_has_a_help_with_an_example() -> None:
    for name in ("ps", "logs", "ssh", "console"):
        code, out, _ = vmbatch(name, "--help")
        assert code == 0
        assert "Example:" in out and "Exit status" in out


# -- suspend / resume -----------------------------------------------------------------------


def test_suspend_pauses_a_running_jobs_vm_and_records_the_operators_pause(site: Site) -> None:
    site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY)
    code, out, err = site.vmbatch("suspend", TORQUE_ID)
    assert code == 0, err
    assert f"VM {domain_name(TORQUE_ID)} paused; `vmbatch resume {TORQUE_ID}`" in out
    rec = StateStore(site.state_dir).read(TORQUE_ID)
    assert rec is not None and rec.pauses == (pausing.OPERATOR,) and rec.paused_at
    # The starter (the user) reads that its VM is paused from root's note.
    assert UserDir(site.user_dir, TORQUE_ID).read_paused() == (True, 1)
    code, out, _ = site.vmbatch("suspend", TORQUE_ID)
    assert code == 0 and "already paused by an operator" in out
    row = [x for x in site.vmbatch("ps")[1].splitlines() if x.startswith(TORQUE_ID)]
    assert " ready:paused(operator) " in row[0], row


def test_resume_continues_only_an_operators_pause(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    resumed: list[str] = []
    monkeypatch.setattr(connection.Connection, "resume", lambda self, name: resumed.append(name))
    site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY)
    code, out, _ = site.vmbatch("resume", TORQUE_ID)
    assert (code, resumed) == (0, []) and "was not paused by `vmbatch suspend`" in out
    # A VM the scheduler also paused stays paused when the operator's pause is taken back.
    site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY,
                pauses=("operator", "scheduler"), paused_at=time.time() - 30)  # fmt: skip
    code, out, _ = site.vmbatch("resume", TORQUE_ID)
    assert (code, resumed) == (0, []) and "stays paused (scheduler)" in out
    code, out, _ = site.vmbatch("resume", TORQUE_ID)
    assert (code, resumed) == (0, []) and "(it is paused by: scheduler); nothing done" in out
    site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY, pauses=("operator",),
                paused_at=time.time() - 30)  # fmt: skip
    UserDir(site.user_dir, TORQUE_ID).write_paused(True, 3)
    code, out, _ = site.vmbatch("resume", TORQUE_ID)
    assert code == 0 and resumed == [domain_name(TORQUE_ID)]
    assert "running again after 30s paused" in out
    rec = StateStore(site.state_dir).read(TORQUE_ID)
    assert rec is not None and rec.pauses == () and rec.paused_at is None
    assert UserDir(site.user_dir, TORQUE_ID).read_paused() == (False, 3)


def test_a_record_from_before_pause_reasons_keeps_its_operators_pause() -> None:
    rec = Record.from_json(b'{"job_id": "1", "scheduler": "slurm", "user": "u",'
                           b' "paused_by": "operator", "paused_at": 5.0}')  # fmt: skip
    assert rec.pauses == ("operator",)
    assert Record.from_json(rec.to_json()) == rec


@pytest.mark.parametrize("command", ["suspend", "resume"])
def test_suspend_and_resume_refuse_what_is_not_a_running_batch_job(
    site: Site, command: str
) -> None:
    code, _, err = site.vmbatch(command, "4711")
    assert code == 65 and "no batch job 4711 on this node" in err
    site.record("4712", domain=domain_name("4712"), phase=KEPT)
    code, _, err = site.vmbatch(command, "4712")
    assert code == 65 and "job 4712 is kept, not running" in err
    code, _, err = site.vmbatch(command, "../x")
    assert code == 65 and "has characters vmbatch does not accept" in err


@pytest.mark.parametrize("command", ["suspend", "resume"])
def test_suspend_and_resume_are_roots(site: Site, as_user: None, command: str) -> None:
    code, _, err = site.vmbatch(command, "42")
    assert code == 65 and f"only root may {command} a job's VM" in err
