"""The guest session's generated files, environment rules and reconnect rules (no guest:
reconnects run against the fake client of :mod:`tests.unit.fakessh`)."""

from __future__ import annotations

import base64
import re
import shlex

import pytest

from tests.unit.conftest import FakeClock
from tests.unit.fakessh import FakeGuest
from vmbatch.errors import Disposition, GuestConnectionError, GuestLostError, JobError
from vmbatch.guest.session import (
    ENV_DENY,
    MAX_ENV_ENTRY,
    GuestJob,
    Session,
    command_script,
    guest_dir,
    install_script,
    job_environment,
    start_script,
)


def _exports(text: str) -> dict[str, str]:
    """What sh would export: each ``export NAME=...`` line must be one shell word."""
    env = {}
    words = shlex.split(text, comments=True)
    for i, word in enumerate(words):
        if word == "export":
            name, value = words[i + 1].split("=", 1)
            env[name] = value
    return env


def test_host_only_variables_are_not_passed() -> None:
    env = {"PATH": "/usr/bin", "SSH_AUTH_SOCK": "/tmp/agent", "TMPDIR": "/tmp/job.1", "A": "1"}
    assert job_environment(env) == {"PATH": "/usr/bin", "A": "1"}
    assert job_environment(env, ENV_DENY | {"A"}) == {"PATH": "/usr/bin"}


def test_names_sh_cannot_export_are_dropped() -> None:
    env = {"BASH_FUNC_x%%": "() { :; }", "A-B": "1", "1X": "2", "ok_1": "3"}
    assert job_environment(env) == {"ok_1": "3"}


def test_oversized_environment_is_a_clear_job_error() -> None:
    with pytest.raises(JobError, match="variable BIG is") as info:
        job_environment({"BIG": "x" * MAX_ENV_ENTRY})
    assert info.value.disposition is Disposition.ABORT_JOB
    many = {f"V{i}": "y" * 100_000 for i in range(11)}
    with pytest.raises(JobError, match=r"environment is \d+ bytes"):
        job_environment(many)


@pytest.mark.parametrize(
    "value",
    ["a'b", 'q"q', "$(reboot)", "`id`", "x; exit 9", "line1\nline2", "back\\slash", "", "é"],
)
def test_start_script_quotes_every_value(value: str) -> None:
    text = start_script({"V": value}, None)
    assert _exports(text) == {"V": value}
    assert text.rstrip().endswith('exec "$1/job"')


def test_start_script_changes_to_the_workdir_or_says_why_not() -> None:
    text = start_script({}, "/data/my dir/it's")
    line = next(ln for ln in text.splitlines() if ln.startswith("cd "))
    words = shlex.split(line)
    assert words[:3] == ["cd", "--", "/data/my dir/it's"]
    assert "does not exist in the guest" in line


def test_start_script_names_the_image_as_one_quoted_value_before_exec() -> None:
    # Run by sh, dash, bash and busybox in tests/integration/test_start_script.py.
    image = "it's; $(reboot)\n`id`"
    text = start_script({"PATH": "/bin"}, "/w", ("a",), image)
    assignment = text[text.index("vmbatch_where=") : text.index("\n(\n")]
    assert shlex.split(assignment) == [f"vmbatch_where=image '{image}'"]  # one word
    lines = text.splitlines()
    cd = next(i for i, ln in enumerate(lines) if ln.startswith("cd -- /w || "))
    assert cd < lines.index("(")
    assert lines[-2:] == [") || exit 127", 'exec "$1/job" a']  # the check, then exec
    assert "vmbatch_where='the guest'\"'\"'s image'" in start_script({}, None)


def test_command_script_runs_argv_exactly() -> None:
    script = command_script(("printf", "%s\n", "$(x)", "a b")).decode()
    assert script.startswith("#!/bin/sh\n")
    assert shlex.split(script.split("\nexec ", 1)[1]) == ["printf", "%s\n", "$(x)", "a b"]


def test_guest_dir_is_one_plain_path_component() -> None:
    assert guest_dir("123.server") == "/var/tmp/vmbatch-123.server"
    for hostile in ("x'; rm -rf /; '/..", "a/b", "$(id)", "a\nb"):
        assert re.fullmatch(r"/var/tmp/vmbatch-[A-Za-z0-9._-]+", guest_dir(hostile))


def test_install_script_carries_every_file_exactly_and_inertly() -> None:
    files = {"job": b"#!/bin/sh\necho '$(x)' `id`\n", "stdin": b"", "bin": bytes(range(256)) * 3}
    text = install_script("/var/tmp/vmbatch-1", files, 60, 5.0).decode("ascii")
    lines = text.split("\n")
    decoded = {}
    i = 0
    while i < len(lines):
        m = re.fullmatch(
            r"base64 -d > /var/tmp/vmbatch-1/(\S+) <<'(VMBATCH-END-OF-FILE)'", lines[i]
        )
        if m:
            end = lines.index(m.group(2), i + 1)
            decoded[m.group(1)] = base64.b64decode("".join(lines[i + 1 : end]))
            i = end
        i += 1
    assert decoded == files
    assert lines[-2] == "exec sh /var/tmp/vmbatch-1/supervisor.sh /var/tmp/vmbatch-1 60 5"
    assert "$(x)" not in text and "`id`" not in text  # contents only as base64


# -- reconnecting ---------------------------------------------------------------------
#
# SSH_RECONNECT_POLICY waits 0.5, 1, 2, 4, 8, then 10 s between failed attempts. With the
# fake clock, a session that gives up after ``reconnect_timeout`` = 60 s has slept about
# that long in at most a dozen attempts; one that never sleeps trips the fake's call limit.


def _session(guest: FakeGuest, **kw: object) -> Session:
    return Session(
        connect=guest.connect,  # type: ignore[arg-type]
        is_alive=lambda: True,
        job=GuestJob("7", b""),
        **kw,  # type: ignore[arg-type]
    )


def test_reconnect_that_hands_back_a_closed_connection_is_a_failed_attempt(
    clock: FakeClock,
) -> None:
    """The precancel spin: ``connect`` returns the same client, whose transport closed."""
    guest = FakeGuest(login="closed")
    client = guest.connect()
    session = Session(
        connect=lambda: client,  # type: ignore[arg-type,return-value]
        is_alive=lambda: True,
        job=GuestJob("7", b""),
        reconnect_timeout=60.0,
        client=client,  # type: ignore[arg-type]
    )
    with pytest.raises(GuestLostError, match="stopped answering") as info:
        session.send_signal(15)
    assert isinstance(info.value.__cause__, GuestConnectionError)
    assert guest.calls <= 30
    assert session.reconnects == 0
    assert 5 <= len(clock.sleeps) <= 12 and all(s > 0 for s in clock.sleeps)
    assert clock.sleeps == sorted(clock.sleeps)  # backing off
    assert sum(clock.sleeps) >= 60.0 - max(clock.sleeps)
    assert guest.commands == []


def test_logins_that_drop_at_once_end_at_reconnect_timeout(clock: FakeClock) -> None:
    """A guest that accepts every login but drops each connection before the command's
    status (crashing, or a job killing its own SSH sessions): each login is one failed
    attempt, with waits between, until reconnect_timeout."""
    guest = FakeGuest(exec_="drop")
    session = _session(guest, reconnect_timeout=60.0)
    with pytest.raises(GuestLostError, match="stopped answering"):
        session.send_signal(15)
    assert 6 <= guest.logins <= 14
    # the first login is the session's own; every later one follows a failed attempt
    assert len(clock.sleeps) == guest.logins - 2
    assert session.reconnects == guest.logins - 1
    assert all(s > 0 for s in clock.sleeps)
    assert len(guest.commands) == guest.logins


def test_a_guest_that_answers_between_drops_keeps_the_job_going(clock: FakeClock) -> None:
    """A long job may lose its connection any number of times: after the guest answered
    (output, a liveness check), a drop starts a new reconnect_timeout, without waiting."""
    guest = FakeGuest()
    session = _session(guest, reconnect_timeout=60.0)
    session.client = guest.connect()  # type: ignore[assignment]
    steps = 0

    def step() -> str:
        nonlocal steps
        steps += 1
        if steps == 6:
            return "done"
        clock.now += 3600.0  # an hour of output ...
        session.heard += 1
        assert session.client is not None
        session.client.close()  # ... then the connection drops
        raise GuestConnectionError("the SSH connection to the guest dropped")

    assert session._until_done("following the job", step) == "done"
    assert session.reconnects == 5
    assert clock.sleeps == []


def test_a_hung_command_is_cut_off_and_counts_as_a_drop(clock: FakeClock) -> None:
    """No answer to an exec (paused guest): each connection is closed after exec_timeout,
    and the attempts end at reconnect_timeout."""
    guest = FakeGuest(exec_="hang")
    session = _session(guest, reconnect_timeout=20.0, exec_timeout=0.01)
    with pytest.raises(GuestLostError, match="did not finish a command within"):
        session.send_signal(15)
    assert 3 <= guest.logins <= 10
    assert len(clock.sleeps) == guest.logins - 2
    assert all(not t.is_active() for t in guest.transports)


def test_a_stopped_domain_ends_reconnecting_at_once(clock: FakeClock) -> None:
    guest = FakeGuest(exec_="drop")
    session = Session(
        connect=guest.connect,  # type: ignore[arg-type]
        is_alive=lambda: False,
        job=GuestJob("7", b""),
    )
    with pytest.raises(GuestLostError, match="the VM stopped while the job was running"):
        session.send_signal(15)
    assert guest.logins == 1 and clock.sleeps == []


def test_start_script_puts_the_job_tools_first_on_path_after_the_jobs_own_path() -> None:
    lines = start_script({"PATH": "/opt/x/bin:/usr/bin"}, None, tools=True).splitlines()
    assert lines.index("export PATH=/opt/x/bin:/usr/bin") < lines.index(
        'export PATH="$1/bin:${PATH:-/usr/local/bin:/usr/bin:/bin}"'
    )
    assert not any("$1/bin" in ln for ln in start_script({}, None).splitlines())
