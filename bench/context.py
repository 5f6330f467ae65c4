#!/usr/bin/env python3
"""Time each contextualization method adds before boot, on the same image in one run.

For every method in ``vmbatch.contextualize.REGISTRY``: a fresh job directory with an
overlay on the Debian guest's ``disk-plain.qcow2`` (the one image all three can work on),
then ``prepare`` timed alone: the NoCloud seed build, the CernVM/HEPiX context CD plus
NoCloud volume, and the offline injection (libguestfs appliance start, edits, flush).
Prints min/median/max per method. The accelerator for the injection appliance is vmbatch's
own choice (``[vm].accel``, default auto: TCG on hosts without working KVM). Figures only.

usage: bench/context.py [--guest /var/cache/vmbatch/guests/debian] [--rounds 10]
                        [--inject-rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmbatch import accel, config  # noqa: E402
from vmbatch.contextualize import REGISTRY, ContextSpec, get_method  # noqa: E402
from vmbatch.contextualize.keys import generate  # noqa: E402
from vmbatch.images.catalog import resolve  # noqa: E402
from vmbatch.images.disks import create_overlay  # noqa: E402
from vmbatch.job import JobUser  # noqa: E402
from vmbatch.state import JobDir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", type=Path, default=Path("/var/cache/vmbatch/guests/debian"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--inject-rounds", type=int, default=3)
    args = ap.parse_args()
    disk = args.guest / "disk-plain.qcow2"
    if not disk.is_file():
        print(f"{disk} missing: run guests/debian/build.sh first", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="vmbatch-bench-") as tmp:
        work = Path(tmp)
        cfg = config.parse(
            {
                "paths": {"job_dir": str(work / "jobs"), "cache_dir": str(work / "cache")},
                "context": {"cvmfs_repositories": ["atlas.cern.ch"], "cvmfs_http_proxy": "DIRECT"},
                "images": {"plain": {"source": str(disk), "format": "qcow2"}},
            }
        )
        (work / "cache").mkdir()
        image = resolve(cfg, "plain")
        user = JobUser("alice", 4242, 4343, "physics", "/home/alice", (("atlas", 5000),))
        print(f"image {disk}; injection appliance accelerator: {accel.choose(cfg).accel}")
        print(f"{'method':<10} {'runs':>4} {'min s':>8} {'median s':>9} {'max s':>8}")
        for name in REGISTRY:
            rounds = args.inject_rounds if name == "inject" else args.rounds
            times = []
            for i in range(rounds):
                jobdir = JobDir(cfg.paths.job_dir, f"{name}-{i}").create()
                create_overlay(cfg, image, jobdir.overlay)
                spec = ContextSpec(
                    instance_id=f"bench-{name}-{i}",
                    hostname=f"vmbatch-{name}-{i}",
                    user=user,
                    authorized_keys=(generate("client").public_openssh,),
                    host_key=generate("host"),
                )
                method = get_method(name, cfg)
                start = time.perf_counter()
                method.prepare(spec, jobdir)
                times.append(time.perf_counter() - start)
                jobdir.remove()
            print(
                f"{name:<10} {rounds:>4} {min(times):>8.3f} {statistics.median(times):>9.3f}"
                f" {max(times):>8.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
