#!/usr/bin/env python3
"""Suspend and resume latency of a job's VM: through the real Slurm and by hand.

Starts the single-node Slurm of the system tests (tests/system/slurmcluster.py) with
vmbatch's hooks (as docs/admin-slurm.md), the tiny guest and ``vmbatch agent``, submits a
job that keeps its vCPU busy, and for each round measures on the host:

- ``scontrol suspend`` -> VM paused: from the command's start until libvirt reports the
  domain paused (polled every 5 ms). Slurm stops the job's starter with SIGTSTP, the
  starter stops itself, the agent (polling every 0.25 s, its default) pauses the VM;
- ``scontrol resume`` -> VM running, 3 s after the suspend: slurmstepd sends SIGSTOP 2 s
  after SIGTSTP and handles a resume only after that (measured: a resume at once took
  2.0 s), so the bench waits that out;
- ``vmbatch suspend`` / ``vmbatch resume`` -> paused / running: an operator's pause, from
  the command's start (a new process: Python start, configuration, libvirt connection).

Figures only: nothing is asserted. Run as root after ``make test``'s set-up (libvirtd up,
tiny guest built): ``.venv/bin/python bench/suspend.py [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from slurm import bench_site  # noqa: E402

from tests.system.slurmhooks import BIN, vmbatch_cluster  # noqa: E402
from vmbatch import config  # noqa: E402
from vmbatch.libvirt.connection import Connection  # noqa: E402
from vmbatch.libvirt.domain import domain_name  # noqa: E402

WORK = Path("/var/lib/vmbatch/bench-suspend")
#: Busy in the guest for a long time (ended by scancel after the rounds).
BUSY = "#!/bin/sh\necho started\nwhile :; do :; done\n"


def _poll(ok: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError("bench step did not finish in time")
        time.sleep(0.005)  # polling with a deadline


def _timed(command: Callable[[], object], conn: Connection, name: str, state: str) -> float:
    t0 = time.monotonic()
    command()

    def reached() -> bool:
        status = conn.status(name)
        return status is not None and status.state == state

    _poll(reached, 60)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", type=Path, default=Path("/var/cache/vmbatch/guests/tiny"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    guest = args.guest.resolve()
    root, cfg_file = bench_site(WORK, guest)
    cfg = config.load(cfg_file)
    vmbatch = [str(BIN / "vmbatch"), "-c", str(cfg_file)]
    print(f"guest {guest}; {args.rounds} rounds; agent polling every 0.25 s")
    figures: dict[str, list[float]] = {k: [] for k in ("ss", "sr", "vs", "vr")}
    agent = subprocess.Popen([*vmbatch, "agent"], stdin=subprocess.DEVNULL)
    try:
        with (
            vmbatch_cluster(root, cfg_file) as cluster,
            cluster.test_user("vmbench", 4691) as user,
            Connection(cfg.libvirt) as conn,
        ):
            job_id = cluster.sbatch(BUSY, user.name, user.home)
            out = user.home / f"slurm-{job_id}.out"
            _poll(lambda: out.exists() and "started" in out.read_text(errors="replace"))
            name = domain_name(job_id)

            def run(*argv: str) -> None:
                subprocess.run([*vmbatch, *argv], check=True, capture_output=True)

            for i in range(args.rounds):
                figures["ss"].append(
                    _timed(lambda: cluster.scontrol("suspend", job_id), conn, name, "paused")
                )
                time.sleep(3)  # slurmstepd's SIGSTOP, 2 s after its SIGTSTP (docstring)
                figures["sr"].append(
                    _timed(lambda: cluster.scontrol("resume", job_id), conn, name, "running")
                )
                figures["vs"].append(_timed(lambda: run("suspend", job_id), conn, name, "paused"))
                figures["vr"].append(_timed(lambda: run("resume", job_id), conn, name, "running"))
                print(
                    f"  round {i + 1}: scontrol suspend {figures['ss'][-1]:.3f}s"
                    f"  resume {figures['sr'][-1]:.3f}s  vmbatch suspend {figures['vs'][-1]:.3f}s"
                    f"  resume {figures['vr'][-1]:.3f}s",
                    flush=True,
                )
            cluster.cancel_jobs(f"--user={user.name}")
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    print("\nmedians (seconds, command start -> libvirt's new state)")
    print(f"  scontrol suspend -> VM paused    {med(figures['ss']):6.3f}")
    print(f"  scontrol resume  -> VM running   {med(figures['sr']):6.3f}")
    print(f"  vmbatch suspend  -> VM paused    {med(figures['vs']):6.3f}")
    print(f"  vmbatch resume   -> VM running   {med(figures['vr']):6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
