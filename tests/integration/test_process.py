from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time

import pytest

from vmbatch import process
from vmbatch.errors import CommandError, CommandTimeoutError


def test_runs_and_captures() -> None:
    res = process.run(["/bin/sh", "-c", "echo out; echo err >&2"], timeout=10)
    assert (res.returncode, res.stdout, res.stderr) == (0, "out\n", "err\n")


def test_failure_names_the_last_stderr_line() -> None:
    with pytest.raises(CommandError, match="sh failed: second") as info:
        process.run(["/bin/sh", "-c", "echo first >&2; echo second >&2; exit 3"], timeout=10)
    assert info.value.returncode == 3


def test_timeout_kills_the_whole_process_group(tmp_path: object) -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeoutError, match="did not finish within 1s"):
        process.run(["/bin/sh", "-c", "sleep 30 & echo $! > /dev/stderr; wait"], timeout=1)
    assert time.monotonic() - start < 10


def test_relative_and_missing_programs_are_refused() -> None:
    with pytest.raises(CommandError, match="must be given by absolute path"):
        process.run(["sh", "-c", "true"], timeout=5)
    with pytest.raises(CommandError, match="cannot run /nonexistent/tool"):
        process.run(["/nonexistent/tool"], timeout=5)


def test_environment_is_minimal() -> None:
    os.environ["VMBATCH_PRIVATE_VAR"] = "x"
    try:
        res = process.run(["/usr/bin/env"], timeout=5)
    finally:
        del os.environ["VMBATCH_PRIVATE_VAR"]
    assert "VMBATCH_PRIVATE_VAR" not in res.stdout
    assert "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in res.stdout


def test_umask_applies_to_the_child_only() -> None:
    res = process.run(["/bin/sh", "-c", "umask"], timeout=5, umask=0o077)
    assert res.stdout.strip() == "0077"
    mine = os.umask(0o022)
    os.umask(mine)
    inherited = process.run(["/bin/sh", "-c", "umask"], timeout=5).stdout.strip()
    assert int(inherited, 8) == mine


def _exited(pidfd: int) -> bool:
    """A pidfd is readable once its process has exited (zombies included)."""
    return bool(select.select([pidfd], [], [], 0)[0])


def test_a_tagged_daemon_is_found_and_killed_after_its_starter_is_gone() -> None:
    tag = process.new_tag()
    # Like guestfish --listen: the command returns at once and leaves a daemon with a child
    # running. The daemon prints both PIDs once both exist; head's exit ends the command
    # (the daemon holds none of its stdin/stderr, else process.run would wait for it).
    res = process.run(
        ["/bin/sh", "-c", "{ sh -c 'sleep 300 & echo $$ $!; wait' <&- 2>&- & } | head -n1"],
        timeout=10,
        env={process.TAG_VAR: tag},
    )
    pids = sorted(map(int, res.stdout.split()))
    fds = [os.pidfd_open(pid) for pid in pids]
    # The same program without the tag: must be left alone.
    bystander = subprocess.Popen(["/bin/sleep", "300"])
    try:
        assert process.tagged(tag) == pids  # the daemon and its sleep, nothing else
        assert process.kill_tagged(tag, timeout=10) == pids
        assert all(_exited(fd) for fd in fds)  # dead on return, not some time later
        assert process.tagged(tag) == []
        assert bystander.poll() is None
        assert process.kill_tagged(tag, timeout=10) == []  # nothing left: a no-op
    finally:
        for fd in fds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        bystander.kill()
        bystander.wait()


def test_wait_exit_counts_an_untagged_or_missing_process_as_gone() -> None:
    tag = process.new_tag()
    assert process.wait_exit(os.getpid(), tag, 0)  # alive but not tagged: not ours
    with pytest.raises(ValueError, match="not a process tag"):
        process.tagged("x; rm -rf /")
