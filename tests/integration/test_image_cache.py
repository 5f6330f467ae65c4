"""The node image cache with real processes and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import json
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
from vmbatch.errors import ImageSourceError
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
    cache.mark_used(paths[1], "job-1")  # busy: in use by a job of this boot
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


def _cache(tmp_path: Path, server: Server, **image: object) -> tuple[ImageCache, config.Config]:
    cfg = config.parse(
        {
            "paths": {"cache_dir": str(tmp_path / "cache")},
            "disks": {"reserve_gib": 0},
            "images": {"img": {"source": server.url("/img.raw"), **image}},
        }
    )
    return ImageCache(cfg), cfg


def test_unpacked_copy_of_a_compressed_source_is_verified(server: Server, tmp_path: Path) -> None:
    packed = gzip.compress(BODY)
    server.resources["/img.raw.gz"] = Resource(packed)
    cfg = config.parse(
        {
            "paths": {"cache_dir": str(tmp_path / "cache")},
            "images": {
                "img": {
                    "source": server.url("/img.raw.gz"),
                    "sha256": hashlib.sha256(packed).hexdigest(),
                }
            },
        }
    )
    cache = ImageCache(cfg)
    entry = cfg.images["img"]
    path = cache.ensure(entry)
    assert path.read_bytes() == BODY
    assert cache.meta(path)["sha256"] == SHA  # recorded when it was unpacked
    assert cache.verify(entry) is True
    with path.open("r+b") as fh:  # bit rot in the cached, unpacked copy
        fh.seek(4096)
        fh.write(b"\xff")
    assert cache.verify(entry) is False
    assert not path.exists()
    assert cache.ensure(entry).read_bytes() == BODY  # fetched again on next use


def test_refresh_revalidates_and_replaces_only_a_changed_image(
    server: Server, tmp_path: Path
) -> None:
    res = server.resources["/img.raw"] = Resource(BODY)
    cache, cfg = _cache(tmp_path, server, verify=False, refresh_interval=3600)
    entry = cfg.images["img"]
    path = cache.ensure(entry)
    assert cache.ensure(entry) == path  # fresh: no request at all
    assert len(server.wait_idle()) == 1

    def age() -> None:  # pretend the last fetch was long ago
        meta = json.loads(path.with_name(path.name + ".meta").read_text())
        meta["fetched_at"] -= 7200
        path.with_name(path.name + ".meta").write_text(json.dumps(meta))

    age()
    assert cache.ensure(entry).read_bytes() == BODY
    hit = server.wait_idle()[-1]
    assert (hit.status, hit.if_none_match) == (304, res.etag)
    new = os.urandom(len(BODY))
    res.body = new  # a new version upstream
    age()
    assert cache.ensure(entry).read_bytes() == new
    assert server.wait_idle()[-1].status == 200
    assert cache.meta(path)["sha256"] == hashlib.sha256(new).hexdigest()
    # The server goes away: the cached copy is still used.
    del server.resources["/img.raw"]
    age()
    assert cache.ensure(entry).read_bytes() == new


def test_pull_evicts_unused_images_to_stay_under_the_cap(server: Server, tmp_path: Path) -> None:
    bodies = {n: os.urandom(2**20) for n in ("a", "b", "c")}
    images = {}
    for n, body in bodies.items():
        server.resources[f"/{n}.raw"] = Resource(body)
        images[n] = {"source": server.url(f"/{n}.raw"), "sha256": hashlib.sha256(body).hexdigest()}
    cfg = config.parse(
        {
            "paths": {"cache_dir": str(tmp_path / "cache")},
            "cache": {"max_size_gib": 2.5 / 1024},  # room for two of the three
            "disks": {"reserve_gib": 0},
            "images": images,
        }
    )
    cache = ImageCache(cfg)
    a = cache.ensure(cfg.images["a"], job_id="job-a")  # in use by a running job
    b = cache.ensure(cfg.images["b"])
    c = cache.ensure(cfg.images["c"])  # needs room: b goes, a is in use
    assert a.exists() and c.exists() and not b.exists()
    cache.release(a, "job-a")
    assert cache.ensure(cfg.images["b"]).exists()  # now a (least recently used) goes
    assert not a.exists()


def test_reserve_refuses_a_download_that_does_not_fit(server: Server, tmp_path: Path) -> None:
    server.resources["/img.raw"] = Resource(BODY)
    conf = tmp_path / "vmbatch.toml"
    conf.write_text(
        f'[paths]\ncache_dir = "{tmp_path / "cache"}"\n'
        "[disks]\nreserve_gib = 1000000\n"
        f'[images.img]\nsource = "{server.url("/img.raw")}"\nsha256 = "{SHA}"\n'
    )
    proc = _pull(conf)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err.decode()  # requeue: the node is short of space
    assert "reserve_gib" in err.decode() and "img" in err.decode()
    assert [p.name for p in (tmp_path / "cache" / "images").iterdir()] == []


def test_in_use_markers_block_eviction_until_released_or_rebooted(
    server: Server, tmp_path: Path
) -> None:
    server.resources["/img.raw"] = Resource(BODY)
    cache, cfg = _cache(tmp_path, server, sha256=SHA)
    path = cache.ensure(cfg.images["img"], job_id="job/1")
    assert cache.entries()[0].jobs == ("job_1",)
    assert not cache.remove(path)
    cache.release(path, "job/1")
    cache.release(path, "job/1")  # idempotent
    marker = path.with_name(path.name + ".jobs") / "crashed-job"
    marker.write_text("a-boot-id-from-before-the-reboot\n")
    assert cache.entries()[0].jobs == ()  # a stale marker does not pin the image
    assert not marker.exists()
    assert cache.remove(path)
    assert sorted(p.name for p in cache.dir.iterdir()) == []


def test_failed_fetch_leaves_no_in_use_marker(server: Server, tmp_path: Path) -> None:
    server.resources["/img.raw"] = Resource(BODY, status=404)
    cache, cfg = _cache(tmp_path, server, sha256=SHA)
    with pytest.raises(ImageSourceError):
        cache.ensure(cfg.images["img"], job_id="job-1")
    jobs = cache.path_for(cfg.images["img"]).with_name(
        cache.path_for(cfg.images["img"]).name + ".jobs"
    )
    assert not jobs.exists() or list(jobs.iterdir()) == []
