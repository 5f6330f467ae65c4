#!/usr/bin/env python3
"""Per-job overhead through a real Slurm: a 1-second job, in its own VM, start to finish.

Starts the single-node Slurm of the system tests (tests/system/slurmcluster.py) with
vmbatch's Prolog, Epilog, oci.conf and job_submit.lua (as docs/admin-slurm.md) and the tiny
guest, then for each round submits ``echo first; sleep 1`` as an unprivileged user and
measures on the host:

- start -> first command: from the Prolog's start (the job's state record) to the moment
  the job's first output line is in slurm-<id>.out (an upper bound: it includes the
  streaming of that line);
- epilogue: the Epilog's own duration (timed by its shim);
- submit -> settled: sbatch to the node being idle again with nothing left behind.

Next to them it prints bench/boot.py's raw QEMU boot-to-``ssh true`` of the same guest.
Figures only: nothing is asserted. Run as root after ``make test``'s set-up (libvirtd up,
tiny guest built): ``.venv/bin/python bench/slurm.py [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from boot import raw_boot, tiny_config  # noqa: E402

from tests.system.slurmcluster import SlurmCluster  # noqa: E402
from tests.system.slurmhooks import BIN, vmbatch_cluster  # noqa: E402
from vmbatch import accel  # noqa: E402

WORK = Path("/var/lib/vmbatch/bench-slurm")


def _poll(ok: object, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ok():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("bench step did not finish in time")
        time.sleep(0.02)  # polling with a deadline


def bench_site(work: Path, guest: Path) -> tuple[Path, Path]:
    """A fresh root directory under ``work`` and a vmbatch configuration in it with
    ``guest`` as the default image "demo": (root, configuration file)."""
    root = work / uuid.uuid4().hex[:8]
    root.mkdir(parents=True)
    for d in (work, root):
        d.chmod(0o755)
    register = subprocess.run(
        [str(ROOT / "scripts" / "register-guest"), "demo", str(guest)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    cfg_file = root / "vmbatch.toml"
    cfg_file.write_text(
        f'[vm]\noutbound_network = false\n[paths]\njob_dir = "{root}/jobs"\n'
        f'cache_dir = "{root}/cache"\n[batch]\ndefault_image = "demo"\n'
        f'state_dir = "{root}/state"\nuser_dir = "{root}/run"\n'
        f'accounting_log = "{root}/accounting.jsonl"\n{register}'
    )
    return root, cfg_file


def one_job(
    cluster: SlurmCluster, user: str, home: Path, root: Path, times: Path, index: int
) -> tuple[float, float, float]:
    """(start -> first command, epilogue, submit -> settled) of one 1-second job."""
    t_submit = time.time()
    job_id = cluster.sbatch("#!/bin/sh\necho first\nsleep 1\n", user, home)
    record = root / "state" / f"{job_id}.json"
    out = home / f"slurm-{job_id}.out"
    started: list[float] = []

    def have_start() -> bool:
        try:
            started.append(json.loads(record.read_text())["started"])
            return True
        except (OSError, ValueError, KeyError):
            return False

    _poll(have_start)
    _poll(lambda: out.exists() and "first" in out.read_text(errors="replace"))
    t_first = time.time()
    _poll(lambda: times.exists() and len(times.read_text().splitlines()) > index)
    _poll(lambda: cluster.node()["State"] == "IDLE" and not record.exists())
    t_done = time.time()
    e0, e1 = map(float, times.read_text().splitlines()[index].split())
    return t_first - started[0], e1 - e0, t_done - t_submit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", type=Path, default=Path("/var/cache/vmbatch/guests/tiny"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    guest = args.guest.resolve()
    root, cfg_file = bench_site(WORK, guest)
    times = root / "epilog.times"
    epilog = root / "epilog-timed"
    epilog.write_text(
        f"#!/bin/sh\nt0=$(/usr/bin/date +%s.%N)\nVMBATCH_CONFIG={cfg_file}"
        f" {BIN}/vmbatch-epilogue; rc=$?\n"
        f'echo "$t0 $(/usr/bin/date +%s.%N)" >> {times}\nexit $rc\n'
    )
    epilog.chmod(0o755)
    choice = accel.choose(tiny_config(guest))
    print(f"guest {guest}; accelerator {choice.accel}; {args.rounds} rounds of a 1 s job")
    first: list[float] = []
    epi: list[float] = []
    total: list[float] = []
    raw: list[float] = []
    try:
        with (
            vmbatch_cluster(root, cfg_file, epilog=epilog) as cluster,
            cluster.test_user("vmbench", 4690) as user,
        ):
            for i in range(args.rounds):
                f, e, t = one_job(cluster, user.name, user.home, root, times, i)
                first.append(f)
                epi.append(e)
                total.append(t)
                raw.append(raw_boot(tiny_config(guest), guest, choice.domain_type))
                print(
                    f"  round {i + 1}: start->first command {first[-1]:.2f}s  epilogue"
                    f" {epi[-1]:.2f}s  submit->settled {total[-1]:.2f}s  raw boot {raw[-1]:.2f}s",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    print("\nmedians (seconds)")
    print(f"  raw qemu boot-to-ssh-true (bench/boot.py)  {med(raw):6.2f}")
    print(f"  job start -> first command in the guest    {med(first):6.2f}")
    print(f"  epilogue                                   {med(epi):6.2f}")
    print(f"  sbatch -> node idle, nothing left          {med(total):6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
