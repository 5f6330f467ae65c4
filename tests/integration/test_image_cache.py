"""The node image cache with real processes and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.httpserver import Resource, Server, serve
from vmbatch import config
from vmbatch.images.cache import ImageCache

VMBATCH = [sys.executable, "-m", "vmbatch"]
BODY = os.urandom(8 * 1024 * 1024)
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as s:
        yield s


def _site(tmp_path: Path, server: Server, path: str = "/img.raw") -> Path:
    conf = tmp_path / "vmbatch.toml"
    conf.write_text(
        f'[paths]\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[images.img]\nsource = "{server.url(path)}"\nsha256 = "{SHA}"\n'
    )
    return conf


def _pull(conf: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*VMBATCH, "-c", str(conf), "image", "pull", "img"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_eight_concurrent_pulls_download_once(server: Server, tmp_path: Path) -> None:
    # The first download pauses long enough that the other seven start (Python start-up
    # of eight processes on two cores takes a few seconds) and must wait for it.
    server.resources["/img.raw"] = Resource(BODY, stall_after=65536, stall_seconds=5)
    conf = _site(tmp_path, server)
    procs = [_pull(conf) for _ in range(8)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [r[1] for r in results]
    server.wait_idle()
    assert server.bytes_served("/img.raw") == len(BODY)  # exactly one full download
    cache = ImageCache(config.load(conf))
    [entry] = cache.entries()
    assert hashlib.sha256(entry.path.read_bytes()).hexdigest() == SHA
    assert not list(cache.dir.glob(".*part*"))


def test_pull_after_sigkill_mid_transfer_completes(server: Server, tmp_path: Path) -> None:
    server.resources["/img.raw"] = Resource(BODY, stall_after=2 * 1024 * 1024, stall_seconds=30)
    conf = _site(tmp_path, server)
    first = _pull(conf)
    part = tmp_path / "cache" / "images"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the download is under way
        parts = list(part.glob(".*.part")) if part.is_dir() else []
        if parts and parts[0].stat().st_size >= 2 * 1024 * 1024:
            break
        time.sleep(0.05)
    else:
        first.kill()
        raise AssertionError("download never started")
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = _pull(conf)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err.decode()
    cache = ImageCache(config.load(conf))
    [entry] = cache.entries()
    assert entry.path.read_bytes() == BODY
    # The second pull resumed the killed one's partial file instead of starting over.
    assert [rng for _, rng in server.starts] == [None, "bytes=2097152-"]


def test_prune_evicts_least_recently_used_but_never_an_image_in_use(tmp_path: Path) -> None:
    cfg = config.parse(
        {"paths": {"cache_dir": str(tmp_path)}, "cache": {"max_size_gib": 2.5 / 1024}}
    )  # 2.5 MiB
    cache = ImageCache(cfg)
    cache.dir.mkdir(parents=True)
    paths = []
    for i, name in enumerate(["old", "busy", "new"]):
        p = cache.dir / f"{name}-0.img"
        p.write_bytes(b"\0" * 2**20)
        stamp = p.with_name(p.name + ".used")
        stamp.touch()
        os.utime(stamp, (1000 + i, 1000 + i))
        paths.append(p)
    cache.mark_used(paths[1], "job-1")  # busy: in use (and now most recently used)
    os.utime(paths[1].with_name(paths[1].name + ".used"), (999, 999))  # oldest of all
    assert cache.prune() == [paths[0]]  # 3 MiB > 2.5 MiB: evict "old", skip busy "busy"
    assert paths[1].exists() and paths[2].exists()


def test_doctor_reports_an_uncached_image_without_downloading_it(
    server: Server, tmp_path: Path
) -> None:
    from vmbatch.doctor import _image

    server.resources["/img.raw"] = Resource(BODY)
    check = _image(config.load(_site(tmp_path, server)), "img")
    assert check.ok and "not cached yet" in check.detail
    assert server.starts == []
