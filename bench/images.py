#!/usr/bin/env python3
"""Image benchmarks: overlay creation, download throughput, single flight. Figures only.

1. Overlay creation (``images.disks.create_overlay``, i.e. ``qemu-img create -b``) on a
   100 MiB and on a 10 GiB sparse raw base: the median of N runs each and their ratio
   (metadata only, so the ratio should be about 1).
2. Download throughput on loopback: the same file fetched by ``curl -o`` and by vmbatch's
   ``images.download.fetch`` (each in a fresh process, as in a job's prologue), from one
   server process that answers with ``sendfile(2)``
   (so the server is not the bottleneck), each run after ``sync`` so neither pays for the
   other's dirty pages. vmbatch is reported twice: transfer only (until
   the last byte is on disk, comparable to curl) and complete (plus fsync and the SHA-256
   verification that curl does not do); curl is also shown followed by ``sha256sum``.
3. Eight concurrent cold ``vmbatch image pull`` processes of one uncached image from the
   test HTTP server, whose first answer pauses 2 s after 1 MiB so all eight overlap: total
   bytes served and how many images' worth that is (target: 1.0).

usage: bench/images.py [--size-mib 512] [--rounds 10]
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.httpserver import Resource, serve  # noqa: E402
from vmbatch import config  # noqa: E402
from vmbatch.images.catalog import resolve  # noqa: E402
from vmbatch.images.disks import create_overlay  # noqa: E402
from vmbatch.images.download import Checksum, fetch  # noqa: E402

QEMU_IMG = "/usr/bin/qemu-img"


def bench_overlays(work: Path, rounds: int) -> None:
    medians = {}
    for label, size in (("100 MiB", 100 * 2**20), ("10 GiB", 10 * 2**30)):
        base = work / f"base-{size}.raw"
        with base.open("wb") as fh:
            fh.truncate(size)  # sparse
        cfg = config.parse({"images": {"b": {"source": str(base), "format": "raw"}}})
        image = resolve(cfg, "b")
        times = []
        for i in range(rounds):
            dest = work / f"overlay-{i}.qcow2"
            start = time.perf_counter()
            create_overlay(cfg, image, dest)
            times.append(time.perf_counter() - start)
            dest.unlink()
        base.unlink()
        medians[label] = statistics.median(times)
        print(
            f"overlay on a {label:>7} base: median {medians[label] * 1000:7.1f} ms ({rounds} runs)"
        )
    ratio = medians["10 GiB"] / medians["100 MiB"]
    print(f"overlay time ratio 10 GiB / 100 MiB: {ratio:.2f} (target: about 1)")


class _SendfileHandler(http.server.BaseHTTPRequestHandler):
    """GET /<name> answers the file with sendfile(2); nothing else."""

    protocol_version = "HTTP/1.1"
    directory = Path()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.directory / self.path.lstrip("/")
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.flush()
            self.connection.sendfile(fh, 0, size)


def fetch_once(url: str, dest: Path, digest: str) -> None:
    """Child process: fetch like a job's prologue would (a fresh process); print seconds
    until the last byte was written, and in all (fsync and verification included)."""
    last = [0.0]

    def progress(done: int, total: int | None) -> None:
        if done == total:
            last[0] = time.perf_counter()

    start = time.perf_counter()
    fetch("bench", url, dest, checksum=Checksum("sha256", digest), progress=progress)
    print(last[0] - start, time.perf_counter() - start)


def serve_files(directory: Path) -> None:
    """Run the sendfile server (in a child process); print its port and serve forever."""
    _SendfileHandler.directory = directory
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SendfileHandler)
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


def _drop(path: Path) -> None:
    """Delete a downloaded copy and let the file system finish freeing it, so the next run
    does not pay for it."""
    path.unlink(missing_ok=True)
    os.sync()


def bench_download(work: Path, size_mib: int, rounds: int) -> None:
    src = work / "srv"
    src.mkdir()
    body = src / "image.raw"
    with body.open("wb") as fh:
        # Unique data throughout, like a real image (no repeated block).
        for _ in range(size_mib):
            fh.write(os.urandom(2**20))
    digest = hashlib.sha256(body.read_bytes()).hexdigest()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(src)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/image.raw"
        out = work / "out"
        out.mkdir()
        _download_rounds(url, digest, out, size_mib, rounds, f"disk ({work})")
        with tempfile.TemporaryDirectory(prefix="vmbatch-bench-", dir="/dev/shm") as shm:
            _download_rounds(url, digest, Path(shm), size_mib, rounds, "tmpfs (/dev/shm)")
    finally:
        server.terminate()
        server.wait(10)


def _download_rounds(
    url: str, digest: str, out: Path, size_mib: int, rounds: int, where: str
) -> None:
    curl, curl_sum, ours_transfer, ours_total = [], [], [], []
    for _ in range(rounds):
        dest = out / "curl.raw"
        os.sync()  # start each run with no dirty pages of the previous one being flushed
        start = time.perf_counter()
        subprocess.run(["/usr/bin/curl", "-sf", "-o", str(dest), url], check=True)
        curl.append(time.perf_counter() - start)
        subprocess.run(["/usr/bin/sha256sum", str(dest)], check=True, capture_output=True)
        curl_sum.append(time.perf_counter() - start)
        _drop(dest)

        dest = out / "ours.raw"
        os.sync()
        child = subprocess.run(
            [sys.executable, __file__, "--fetch", url, str(dest), digest],
            check=True,
            capture_output=True,
            text=True,
        )
        transfer, total = (float(x) for x in child.stdout.split())
        ours_transfer.append(transfer)
        ours_total.append(total)
        _drop(dest)

    def rate(times: list[float]) -> float:
        return size_mib / statistics.median(times)

    print(f"download of {size_mib} MiB on loopback into {where}, median of {rounds}:")
    print(f"  curl -o                          {rate(curl):8.0f} MiB/s")
    print(f"  curl -o, then sha256sum          {rate(curl_sum):8.0f} MiB/s")
    print(f"  vmbatch fetch, transfer only     {rate(ours_transfer):8.0f} MiB/s")
    print(f"  vmbatch fetch, + fsync + verify  {rate(ours_total):8.0f} MiB/s")
    print(
        f"  ratio vmbatch/curl: transfer {rate(ours_transfer) / rate(curl):.2f} (target >= 0.9),"
        f" complete vs curl+sha256sum {rate(ours_total) / rate(curl_sum):.2f}"
    )


def bench_single_flight(work: Path) -> None:
    image = os.urandom(64 * 2**20)
    with serve() as server:
        server.resources["/img.raw"] = Resource(image, stall_after=2**20, stall_seconds=2)
        conf = work / "vmbatch.toml"
        conf.write_text(
            f'[paths]\ncache_dir = "{work / "cache"}"\n[disks]\nreserve_gib = 0\n'
            f'[images.img]\nsource = "{server.url("/img.raw")}"\n'
            f'sha256 = "{hashlib.sha256(image).hexdigest()}"\n'
        )
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "vmbatch", "-c", str(conf), "image", "pull", "img"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=ROOT,
            )
            for _ in range(8)
        ]
        failed = [p.communicate(timeout=300)[1] for p in procs if p.wait(300) != 0]
        wall = time.perf_counter() - start
        server.wait_idle()
        served = server.bytes_served("/img.raw")
    print(
        f"8 concurrent cold pulls of a 64 MiB image: {len(procs) - len(failed)}/8 succeeded in"
        f" {wall:.1f}s, {served} bytes served = {served / len(image):.2f} images' worth"
        " (target: 1.00)"
    )
    for err in failed:
        print("  failed:", err.decode().strip().splitlines()[-1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fetch", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_files(args.serve)
        return 0
    if args.fetch:
        fetch_once(args.fetch[0], Path(args.fetch[1]), args.fetch[2])
        return 0
    with tempfile.TemporaryDirectory(prefix="vmbatch-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        (work / "overlays").mkdir()
        bench_overlays(work / "overlays", args.rounds)
        bench_download(work, args.size_mib, max(3, args.rounds // 2))
        bench_single_flight(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
