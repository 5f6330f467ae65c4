#!/usr/bin/env python3
"""Guest-session benchmark: SSH-ready to job start, and the host's cost of streaming output.

On one booted guest (``lifecycle.booted``; the job's output files live in the guest's
/tmp, so streaming N GiB needs a guest whose /tmp is on disk: the Debian guest, not the
tiny one, whose root is in RAM):

1. SSH-ready to job start: ``Session.start`` (upload of supervisor, start script and job
   over SSH, supervisor started, job pid known) and until the first byte of a job that
   prints at once; median of N.
2. Streaming: a job writes N GiB to stdout (``head -c ... /dev/zero``); the host side
   follows it into a counting sink. Printed: wall time, throughput, the host process's CPU
   seconds (user+sys, ``getrusage``) per GiB, and its peak RSS before and after.

Figures only. usage: bench/session.py [--guest /var/cache/vmbatch/guests/debian]
                                      [--rounds 10] [--gib 1]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import tiny_config

from vmbatch import lifecycle
from vmbatch.guest.session import GuestJob
from vmbatch.job import interactive


class Sink:
    """A BinaryIO-like sink that only counts; records when the first byte came."""

    def __init__(self) -> None:
        self.n = 0
        self.first: float | None = None

    def write(self, data: bytes) -> int:
        if self.first is None and data:
            self.first = time.perf_counter()
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", type=Path, default=Path("/var/cache/vmbatch/guests/debian"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--gib", type=float, default=1.0)
    args = ap.parse_args()
    cfg = tiny_config(args.guest.resolve())
    with lifecycle.booted(cfg, interactive("demo", ("true",))) as guest:
        starts, firsts = [], []
        for i in range(args.rounds):
            session = guest.session(GuestJob(f"bench-start-{i}", b"#!/bin/sh\necho go\n"))
            t0 = time.perf_counter()
            session.start()
            starts.append(time.perf_counter() - t0)
            out, err = Sink(), Sink()
            session.follow(out, err)  # type: ignore[arg-type]
            assert out.first is not None
            firsts.append(out.first - t0)
        med = statistics.median
        print(
            f"SSH-ready to job started (Session.start): median {med(starts) * 1000:.0f} ms"
            f" (min {min(starts) * 1000:.0f}, max {max(starts) * 1000:.0f}; {args.rounds} runs)"
        )
        print(f"SSH-ready to the job's first output byte: median {med(firsts) * 1000:.0f} ms")
        size = int(args.gib * 2**30)
        script = f"#!/bin/sh\nhead -c {size} /dev/zero\n".encode()
        session = guest.session(GuestJob("bench-stream", script))
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        c0, t0 = cpu(), time.perf_counter()
        session.start()
        out, err = Sink(), Sink()
        status = session.follow(out, err)  # type: ignore[arg-type]
        wall, used = time.perf_counter() - t0, cpu() - c0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            f"streamed {out.n / 2**30:.2f} GiB (status {status}) in {wall:.1f} s:"
            f" {out.n / 2**20 / wall:.0f} MiB/s"
        )
        print(
            f"host CPU {used:.1f} s ({used / max(out.n / 2**30, 1e-9):.1f} s per GiB,"
            f" {100 * used / wall:.0f}% of one core); peak RSS {rss0 // 1024} MiB before,"
            f" {rss1 // 1024} MiB after"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
