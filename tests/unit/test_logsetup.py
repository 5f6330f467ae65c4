"""vmbatch.logsetup: the job id on every line, the syslog and journal formats, redaction,
the fallback to stderr, the per-job vmbatch.log, and the [log] section."""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from vmbatch import cli, config, logsetup
from vmbatch.config import LogConfig
from vmbatch.contextualize.keys import generate
from vmbatch.errors import ConfigError
from vmbatch.hooks import entry
from vmbatch.state import JobDir

log = logging.getLogger("vmbatch.test")


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    """No job, no secret and no handler leaks from one test into the next."""
    saved = set(logsetup._secrets)
    yield
    logsetup.set_job(None)
    logsetup._secrets.clear()
    logsetup._secrets.update(saved)
    for handler in logging.getLogger().handlers:
        handler.close()


class Receiver:
    """A unix datagram socket standing in for syslog or journald."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def all(self) -> list[bytes]:
        got = []
        try:
            while True:
                got.append(self.sock.recv(1 << 20))
        except BlockingIOError:
            return got


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "log.sock")
    yield r
    r.sock.close()


def journal_entry(data: bytes) -> dict[str, str]:
    """Decode one native-protocol entry (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/)."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            key, value = line, data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size] == ord("\n")
            i = nl + 10 + size
        fields[key.decode()] = value.decode()
    return fields


def _cfg(**kw: object) -> LogConfig:
    return config.parse({"log": kw}).log


# -- job id -----------------------------------------------------------------------------


def test_every_line_names_the_job_of_the_process_its_context_or_its_extra(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logsetup.early("vmbatch-prologue", "42")
    log.info("one")
    with logsetup.job("7.srv"):
        log.info("two")
    log.info("three", extra={"job_id": "9"})
    seen: list[str] = []
    thread = threading.Thread(target=lambda: log.warning("from a thread"))
    thread.start()
    thread.join()
    seen = capsys.readouterr().err.splitlines()
    assert seen == [
        "vmbatch-prologue[42]: INFO: one",
        "vmbatch-prologue[7.srv]: INFO: two",
        "vmbatch-prologue[9]: INFO: three",
        "vmbatch-prologue[42]: WARNING: from a thread",
    ]


def test_a_line_without_a_job_names_only_the_program(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.early("vmbatch", None, logging.WARNING)
    log.info("not shown")
    log.warning("shown")
    assert capsys.readouterr().err == "vmbatch: WARNING: shown\n"


def test_hooks_name_the_job_only_when_its_id_is_one(capsys: pytest.CaptureFixture[str]) -> None:
    entry._logging("vmbatch-epilogue", "../../etc")
    log.info("x")
    entry._logging("vmbatch-epilogue", "12[3].srv")
    log.info("y")
    assert capsys.readouterr().err.splitlines() == [
        "vmbatch-epilogue: INFO: x",
        "vmbatch-epilogue[12[3].srv]: INFO: y",
    ]


def test_stage_lines_have_one_form_and_carry_their_numbers() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        logsetup.stage(log, "wait_ssh", 3.14159)
        logsetup.stage(log, "prologue", 5, "the VM is ready")
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in records] == [
        "stage wait_ssh took 3.142s",
        "stage prologue took 5.000s (the VM is ready)",
    ]
    assert [(getattr(r, "stage", None), getattr(r, "seconds", None)) for r in records] == [
        ("wait_ssh", 3.142),
        ("prologue", 5),
    ]


# -- secrets ----------------------------------------------------------------------------


def test_private_keys_are_masked_whole_cut_off_or_escaped() -> None:
    key = generate("x").private_openssh.strip()
    body = key.splitlines()[1]
    assert logsetup.redact(f"before {key} after") == "before [private key redacted] after"
    assert logsetup.redact(f"a {key!r} b") == "a '[private key redacted]' b"
    cut = key[: len(key) // 2]
    assert logsetup.redact(f"x {cut}") == "x [private key redacted]"
    assert body not in logsetup.redact(f"x {cut}")
    rsa = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"
    assert logsetup.redact(rsa) == "[private key redacted]"
    public = "-----BEGIN PUBLIC KEY-----\nMCow\n-----END PUBLIC KEY-----"
    assert logsetup.redact(public) == public


def test_registered_secrets_and_each_of_their_lines_are_masked() -> None:
    key = generate("x").private_openssh
    lines = key.splitlines()
    logsetup.secret(key)
    logsetup.secret("s3cr3t-token-value")
    logsetup.secret("short")  # too short to mask safely: it would hit ordinary words
    assert logsetup.redact(f"got {lines[2]} and s3cr3t-token-value, short") == (
        "got [redacted] and [redacted], short"
    )


def test_every_formatter_redacts_the_message_and_the_traceback(
    capsys: pytest.CaptureFixture[str], receiver: Receiver
) -> None:
    key = generate("x").private_openssh
    logsetup.configure(_cfg(target="syslog", syslog_socket=str(receiver.path)), "t",
                       stderr_level=logging.INFO)  # fmt: skip
    try:
        raise ValueError(key)
    except ValueError:
        log.exception("failed with %s", key)
    err = capsys.readouterr().err
    sent = b"".join(receiver.all()).decode()
    for text in (err, sent):
        assert "PRIVATE KEY" not in text and key.splitlines()[1] not in text
        assert "failed with [private key redacted]" in text
        assert "ValueError: [private key redacted]" in text


def test_the_vms_keys_are_registered_where_they_are_made_and_read() -> None:
    import inspect

    from vmbatch import lifecycle
    from vmbatch.hooks import batch

    assert "logsetup.secret(key.private_openssh)" in inspect.getsource(lifecycle.start_vm)
    assert "logsetup.secret(" in inspect.getsource(batch._endpoint)


def test_site_user_data_errors_never_quote_the_file(tmp_path: Path) -> None:
    from vmbatch.contextualize import nocloud

    f = tmp_path / "site.yaml"
    f.write_text("write_files:\n  - content: hunter2-db-password: [\n")
    with pytest.raises(ConfigError) as info:
        nocloud.load_site_user_data(f)
    assert "hunter2" not in str(info.value)
    assert re.search(r"not valid YAML at line \d+, column \d+", str(info.value))


# -- syslog -----------------------------------------------------------------------------


def test_syslog_lines_are_rfc3164_with_tag_pid_and_job(receiver: Receiver) -> None:
    cfg = _cfg(target="syslog", syslog_socket=str(receiver.path), facility="local3")
    logsetup.configure(cfg, "vmbatch-epilogue", stderr_level=None)
    logsetup.set_job("42")
    log.info("stage teardown took 1.000s")
    log.warning("two\nlines")
    log.debug("not at info")
    got = receiver.all()
    assert len(got) == 2
    pid = os.getpid()
    stamp = r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d"
    assert re.fullmatch(
        rf"<{19 * 8 + 6}>{stamp} vmbatch-epilogue\[{pid}\]: \[job 42\] stage teardown took 1.000s",
        got[0].decode(),
    )
    assert re.fullmatch(
        rf"<{19 * 8 + 4}>{stamp} vmbatch-epilogue\[{pid}\]: \[job 42\] warning: two \| lines",
        got[1].decode(),
    )


def test_long_syslog_lines_are_cut_at_rsyslogs_limit(receiver: Receiver) -> None:
    logsetup.configure(_cfg(target="syslog", syslog_socket=str(receiver.path)), "t",
                       stderr_level=None)  # fmt: skip
    log.error("x" * 20000)
    (got,) = receiver.all()
    assert len(got) == logsetup.SYSLOG_MAX and got.endswith(b" [truncated]")


# -- journald ---------------------------------------------------------------------------


def test_journal_entries_have_the_native_fields(receiver: Receiver) -> None:
    cfg = _cfg(target="journald", journal_socket=str(receiver.path))
    logsetup.configure(cfg, "vmbatch-prologue", stderr_level=None)
    logsetup.set_job("42")
    logsetup.stage(log, "wait_ssh", 2.5)
    log.error("first\nsecond")
    first, second = (journal_entry(d) for d in receiver.all())
    assert first["MESSAGE"] == "[job 42] stage wait_ssh took 2.500s"
    assert first["PRIORITY"] == "6" and first["SYSLOG_FACILITY"] == "3"
    assert first["SYSLOG_IDENTIFIER"] == "vmbatch-prologue"
    assert first["VMBATCH_JOB_ID"] == "42"
    assert (first["VMBATCH_STAGE"], first["VMBATCH_SECONDS"]) == ("wait_ssh", "2.5")
    assert first["CODE_FILE"].endswith("logsetup.py") and first["CODE_FUNC"] == "stage"
    assert second["MESSAGE"] == "[job 42] error: first\nsecond"  # binary-safe framing
    assert second["PRIORITY"] == "3" and "VMBATCH_STAGE" not in second


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(receiver: Receiver) -> None:
    receiver.sock.setblocking(True)
    receiver.sock.settimeout(5)
    logsetup.configure(_cfg(target="journald", journal_socket=str(receiver.path)), "t",
                       stderr_level=None)  # fmt: skip
    big = "y" * (4 << 20)  # beyond any socket buffer
    thread = threading.Thread(target=lambda: log.info("%s", big))
    thread.start()
    data, fds, _, _ = socket.recv_fds(receiver.sock, 4096, 1)
    thread.join()
    assert data == b"" and len(fds) == 1
    try:
        import fcntl

        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        with os.fdopen(fds[0], "rb", closefd=False) as fh:
            fh.seek(0)
            entry_ = journal_entry(fh.read())
    finally:
        os.close(fds[0])
    assert entry_["MESSAGE"] == big


def test_no_journal_falls_back_to_syslog_with_a_warning_there(
    tmp_path: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(journal_socket=str(tmp_path / "none"), syslog_socket=str(receiver.path))
    logsetup.configure(cfg, "vmbatch-prologue", stderr_level=None)
    logsetup.set_job("42")
    log.info("one")
    log.info("two")
    got = [d.decode() for d in receiver.all()]
    assert len(got) == 3 and capsys.readouterr().err == ""
    assert f"[job 42] warning: cannot log to journald at {tmp_path / 'none'}" in got[0]
    assert f"logging to syslog at {receiver.path} instead" in got[0]
    assert got[1].endswith("[job 42] one") and got[2].endswith("[job 42] two")


# -- falling back ------------------------------------------------------------------------


def test_root_hooks_fall_back_to_stderr_once_with_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none"
    cfg = _cfg(target="syslog", syslog_socket=str(missing))
    logsetup.configure(cfg, "vmbatch-prologue", stderr_level=None)
    logsetup.set_job("42")
    log.info("one")
    log.info("two")
    assert capsys.readouterr().err.splitlines() == [
        f"vmbatch-prologue[42]: WARNING: cannot log to syslog at {missing} (No such file or"
        " directory); logging to stderr instead",
        "vmbatch-prologue[42]: INFO: one",
        "vmbatch-prologue[42]: INFO: two",
    ]


def test_a_job_users_stderr_gets_no_fallback_and_no_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The starter (stderr: the job's) and the CLI (a terminal) keep their own level."""
    logsetup.configure(_cfg(journal_socket=str(tmp_path / "a"), syslog_socket=str(tmp_path / "b")),
                       "vmbatch-starter", stderr_level=logging.WARNING)  # fmt: skip
    log.info("for the admin")
    log.warning("for the user")
    assert capsys.readouterr().err == "vmbatch-starter: WARNING: for the user\n"


def test_a_socket_nobody_reads_is_given_up_after_the_timeout(
    receiver: Receiver, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stuck daemon must not hang a hook: its queue fills, a send blocks, and after
    SEND_TIMEOUT the target is given up (each line then goes to stderr)."""
    monkeypatch.setattr(logsetup, "SEND_TIMEOUT", 0.05)
    logsetup.configure(_cfg(target="syslog", syslog_socket=str(receiver.path)), "h",
                       stderr_level=None)  # fmt: skip
    limit = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text()) + 10
    for n in range(limit):
        log.info("line %d", n)
    err = capsys.readouterr().err
    assert err.count("cannot log to syslog") == 1 and "timed out" in err
    queued = len(receiver.all())
    assert 0 < queued < limit
    assert err.count("INFO: line ") == limit - queued


def test_a_refusing_socket_is_reconnected_once_then_given_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s"
    first = Receiver(path)
    logsetup.configure(_cfg(target="syslog", syslog_socket=str(path)), "h", stderr_level=None)
    log.info("one")
    assert len(first.all()) == 1
    first.sock.close()
    path.unlink()
    second = Receiver(path)  # the daemon restarted: a new socket at the same path
    log.info("two")
    assert len(second.all()) == 1 and capsys.readouterr().err == ""
    second.sock.close()
    log.info("three")
    assert "cannot log to syslog" in capsys.readouterr().err


# -- stderr ------------------------------------------------------------------------------


def test_with_a_system_target_root_hooks_print_nothing(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    logsetup.configure(_cfg(target="syslog", syslog_socket=str(receiver.path)),
                       "vmbatch-prologue", stderr_level=None)  # fmt: skip
    log.info("info")
    log.error("error")
    assert capsys.readouterr().err == "" and len(receiver.all()) == 2


def test_target_stderr_keeps_each_entry_points_own_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logsetup.configure(_cfg(target="stderr"), "vmbatch-prologue", stderr_level=None)
    log.info("hook info")
    logsetup.configure(_cfg(target="stderr"), "vmbatch-starter", stderr_level=logging.WARNING)
    log.info("starter info")
    log.warning("starter warning")
    logsetup.configure(_cfg(target="stderr", level="debug"), "vmbatch-epilogue",
                       stderr_level=None)  # fmt: skip
    log.debug("debug on")
    assert capsys.readouterr().err.splitlines() == [
        "vmbatch-prologue: INFO: hook info",
        "vmbatch-starter: WARNING: starter warning",
        "vmbatch-epilogue: DEBUG: debug on",
    ]


def test_paramiko_stays_quiet_even_at_debug() -> None:
    logsetup.configure(_cfg(target="stderr", level="debug"), "h", stderr_level=None)
    assert logging.getLogger("paramiko").getEffectiveLevel() == logging.WARNING


# -- vmbatch.log -------------------------------------------------------------------------


def _file_handler(tmp_path: Path) -> Path:
    base = tmp_path / "jobs"
    base.mkdir()
    logsetup.configure(_cfg(target="stderr", level="warning"), "vmbatch-prologue",
                       stderr_level=None, job_dir=base)  # fmt: skip
    for h in logging.getLogger().handlers:
        h.setLevel(logging.INFO)
    logging.getLogger().setLevel(logging.INFO)
    return base


def test_a_jobs_lines_reach_its_vmbatch_log_from_the_first_once_its_directory_exists(
    tmp_path: Path,
) -> None:
    base = _file_handler(tmp_path)
    logsetup.set_job("42")
    log.info("before the directory")
    jobdir = JobDir(base, "42").create()
    log.info("after it")
    text = jobdir.log.read_text()
    lines = text.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"
    pid = os.getpid()
    assert len(lines) == 2
    assert re.fullmatch(rf"{stamp} vmbatch-prologue\[{pid}\]: \[job 42\] before the directory",
                        lines[0])  # fmt: skip
    assert lines[1].endswith("[job 42] after it")
    st = jobdir.log.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    jobdir.remove()
    log.info("after teardown")  # kept in memory only: nothing recreates the directory
    assert not jobdir.path.exists()


def test_vmbatch_log_is_never_a_link_a_fifo_nor_someone_elses(tmp_path: Path) -> None:
    base = _file_handler(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("")
    for job_id, plant in (
        ("1", lambda p: p.symlink_to(target)),
        ("2", lambda p: os.mkfifo(p)),
        ("3", lambda p: (p.write_text(""), os.chown(p, 65534, 65534))),
    ):
        jobdir = JobDir(base, job_id).create()
        plant(jobdir.log)
        with logsetup.job(job_id):
            log.info("secret-ish detail")
    assert target.read_text() == ""
    assert (JobDir(base, "3").log).read_text() == ""


def test_only_the_main_threads_lines_go_to_the_file(tmp_path: Path) -> None:
    base = _file_handler(tmp_path)
    jobdir = JobDir(base, "42").create()
    logsetup.set_job("42")
    thread = threading.Thread(target=lambda: log.info("from a thread"))
    thread.start()
    thread.join()
    log.info("main")
    assert jobdir.log.read_text().count("[job 42]") == 1


# -- the configuration ------------------------------------------------------------------


def test_log_defaults() -> None:
    cfg = config.Config().log
    assert (cfg.target, cfg.level, cfg.facility) == ("journald", "info", "daemon")
    assert cfg.syslog_socket == Path("/dev/log")
    assert cfg.journal_socket == Path("/run/systemd/journal/socket")


def test_log_section_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(
            {
                "log": {
                    "target": "file",
                    "level": "verbose",
                    "facility": "local9",
                    "syslog_socket": "dev/log",
                    "socket": "/x",
                }
            }
        )
    text = str(info.value)
    assert "[log].target: expected one of 'journald', 'syslog', 'stderr', got 'file'" in text
    assert "[log].level: expected one of 'debug', 'info', 'warning', 'error'" in text
    assert "[log].facility: expected one of 'user', 'daemon', 'local0'" in text
    assert "[log].syslog_socket: must be an absolute path" in text
    assert "[log]: unknown key 'socket'" in text


def test_root_trusts_only_log_sockets_in_roots_directories(tmp_path: Path) -> None:
    cfg = config.parse({"log": {"syslog_socket": str(tmp_path / "d" / "log")}})
    assert tmp_path / "d" in config.root_paths(cfg)
    assert Path("/run/systemd/journal") in config.root_paths(cfg)


def test_target_problem_says_where_lines_go_instead(tmp_path: Path, receiver: Receiver) -> None:
    assert logsetup.target_problem(_cfg(target="stderr")) is None
    ok = _cfg(target="syslog", syslog_socket=str(receiver.path))
    assert logsetup.target_problem(ok) is None
    half = _cfg(journal_socket=str(tmp_path / "j"), syslog_socket=str(receiver.path))
    assert logsetup.target_problem(half) == (
        f"{tmp_path / 'j'}: No such file or directory: logging to {receiver.path}"
    )
    none = _cfg(target="syslog", syslog_socket=str(tmp_path / "s"))
    assert logsetup.target_problem(none) == (
        f"{tmp_path / 's'}: No such file or directory: logging to stderr"
    )


# -- the entry points -------------------------------------------------------------------


def test_the_cli_logs_to_the_target_and_shows_its_verbosity(
    tmp_path: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "vmbatch.toml"
    f.write_text(f'[log]\ntarget = "syslog"\nsyslog_socket = "{receiver.path}"\n')
    f.chmod(0o644)
    warned = ["vmbatch: WARNING: w"]
    for verbose, shown in ((0, warned), (1, ["vmbatch: INFO: i", *warned])):
        ctx = click.Context(cli.cli, obj={"config": f, "verbose": verbose})
        cli._load(ctx)
        log.debug("d")
        log.info("i")
        log.warning("w")
        assert capsys.readouterr().err.splitlines() == shown
        assert [d.decode().partition("]: ")[2] for d in receiver.all()] == ["i", "warning: w"]


def test_the_epilogue_logs_to_the_target_with_the_job_and_prints_nothing(
    tmp_path: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str], test_uri: str
) -> None:
    f = tmp_path / "vmbatch.toml"
    f.write_text(
        f'[libvirt]\nuri = "{test_uri}"\n'
        f'[paths]\njob_dir = "{tmp_path / "jobs"}"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[batch]\nstate_dir = "{tmp_path / "state"}"\nuser_dir = "{tmp_path / "run"}"\n'
        f'accounting_log = "{tmp_path / "acct.jsonl"}"\n'
        f'[log]\ntarget = "syslog"\nsyslog_socket = "{receiver.path}"\n'
    )
    argv = ["vmbatch-epilogue", "--config", str(f), "5.srv", "u", "g", "job", "1", "",
            "", "batch", "", "0", "/dev/null"]  # fmt: skip
    assert entry.run_epilogue(argv, {}) == 0
    assert capsys.readouterr().err == ""
    lines = [d.decode().partition("]: ")[2] for d in receiver.all()]
    assert lines and all(line.startswith("[job 5.srv] ") for line in lines), lines
    assert any(re.fullmatch(r"\[job 5\.srv\] stage teardown took \d+\.\d{3}s \(VM and files"
                            r" removed\)", line) for line in lines)  # fmt: skip
