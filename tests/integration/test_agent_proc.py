"""The node agent reads a real process's state from the real /proc (vmbatch/agent.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from vmbatch import agent


def test_a_stopped_process_is_in_state_t_and_continues_in_another(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert (p := agent.read_proc(child.pid)) is not None and p.state in "RS"
        assert p.ppid == os.getpid() and p.uid == os.getuid()
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while (p := agent.read_proc(child.pid)) is not None and p.state != "T":
            assert time.monotonic() < deadline, p
            time.sleep(0.01)  # polling with a deadline: the kernel stops it asynchronously
        os.kill(child.pid, signal.SIGCONT)
        while (p := agent.read_proc(child.pid)) is not None and p.state == "T":
            assert time.monotonic() < deadline, p
            time.sleep(0.01)  # polling with a deadline
        assert agent.read_proc(child.pid, tmp_path) is None  # not in that table
    finally:
        child.kill()
        child.wait()
    assert agent.read_proc(child.pid) is None
