from __future__ import annotations

import os
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
