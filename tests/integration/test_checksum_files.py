"""Images verified by the checksum file published beside them (``checksum_url``), with the
node cache and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.httpserver import Resource, Server, serve
from vmbatch import config
from vmbatch.errors import ImageError, ImageSourceError, ImageVerifyError
from vmbatch.images.cache import MAX_CHECKSUM_FILE, ImageCache

BODY = os.urandom(2 * 1024 * 1024)
NAME = "debian-12-genericcloud-amd64.qcow2"


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as s:
        yield s


def _cache(tmp_path: Path, server: Server, **image: object) -> tuple[ImageCache, config.Config]:
    cfg = config.parse(
        {
            "paths": {"cache_dir": str(tmp_path / "cache")},
            "disks": {"reserve_gib": 0},
            "images": {
                "img": {
                    "source": server.url(f"/12/latest/{NAME}"),
                    "checksum_url": server.url("/12/latest/SHA512SUMS"),
                    **image,
                }
            },
        }
    )
    return ImageCache(cfg), cfg


def _sums(*lines: tuple[bytes, str]) -> bytes:
    """A Debian-style SHA512SUMS listing (body, name) pairs."""
    return "".join(f"{hashlib.sha512(b).hexdigest()}  {n}\n" for b, n in lines).encode()


def test_the_image_is_verified_by_its_line_in_the_checksum_file(
    server: Server, tmp_path: Path
) -> None:
    server.resources[f"/12/latest/{NAME}"] = Resource(BODY)
    server.resources["/12/latest/SHA512SUMS"] = Resource(
        _sums((b"other", "debian-12-generic-amd64.qcow2"), (BODY, NAME))
    )
    cache, cfg = _cache(tmp_path, server)
    path = cache.ensure(cfg.images["img"])
    assert path.read_bytes() == BODY
    meta = cache.meta(path) or {}
    assert meta["listed"] == {"algorithm": "sha512", "hexdigest": hashlib.sha512(BODY).hexdigest()}
    assert meta["sha256"] == hashlib.sha256(BODY).hexdigest()  # for `vmbatch image verify`
    assert cache.verify(cfg.images["img"]) is True
    # Cached: the next job asks the server nothing, not even the checksum file.
    before = len(server.wait_idle())
    assert cache.ensure(cfg.images["img"]) == path
    assert len(server.wait_idle()) == before
    assert sorted(p.name for p in cache.dir.iterdir() if p.name.startswith(".")) == []


def test_bsd_checksum_file_with_transient_errors_is_retried(server: Server, tmp_path: Path) -> None:
    # Rocky's CHECKSUM layout; the mirror answers 500 twice first (the download policy).
    name = "Rocky-9-GenericCloud-Base.latest.x86_64.qcow2"
    server.resources[f"/9/{name}"] = Resource(BODY)
    server.resources["/9/CHECKSUM"] = Resource(
        f"# {name}: {len(BODY)} bytes\n"
        f"SHA256 ({name}) = {hashlib.sha256(BODY).hexdigest()}\n".encode(),
        fail_first=2,
    )
    cache, cfg = _cache(
        tmp_path, server, source=server.url(f"/9/{name}"), checksum_url=server.url("/9/CHECKSUM")
    )
    assert cache.ensure(cfg.images["img"]).read_bytes() == BODY
    statuses = [h.status for h in server.wait_idle() if h.path == "/9/CHECKSUM"]
    assert statuses == [500, 500, 200]


def test_a_mismatch_deletes_the_download_and_names_the_checksum_file(
    server: Server, tmp_path: Path
) -> None:
    server.resources[f"/12/latest/{NAME}"] = Resource(BODY)
    server.resources["/12/latest/SHA512SUMS"] = Resource(_sums((b"not the image", NAME)))
    cache, cfg = _cache(tmp_path, server)
    with pytest.raises(ImageVerifyError, match=r"sha512 of the download from .* expected"):
        cache.ensure(cfg.images["img"])
    assert [p.name for p in cache.dir.iterdir() if not p.name.endswith(".lock")] == []


def test_a_checksum_file_without_the_image_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    server.resources[f"/12/latest/{NAME}"] = Resource(BODY)
    server.resources["/12/latest/SHA512SUMS"] = Resource(
        _sums((BODY, "debian-12-generic-amd64.qcow2"))
    )
    cache, cfg = _cache(tmp_path, server)
    with pytest.raises(ImageVerifyError) as info:
        cache.ensure(cfg.images["img"])
    assert (
        f"the checksum file {server.url('/12/latest/SHA512SUMS')} lists 1 file(s) but not {NAME!r}"
    ) in str(info.value)
    assert "checksum_url" in (info.value.hint or "")
    assert server.bytes_served(f"/12/latest/{NAME}") == 0  # the image was never fetched


def test_a_missing_or_oversized_checksum_file_names_checksum_url(
    server: Server, tmp_path: Path
) -> None:
    server.resources[f"/12/latest/{NAME}"] = Resource(BODY)
    cache, cfg = _cache(tmp_path, server)
    with pytest.raises(ImageSourceError) as info:  # 404: not retried
        cache.ensure(cfg.images["img"])
    assert "SHA512SUMS answered 404" in str(info.value)
    assert "[images.img].checksum_url" in (info.value.hint or "")
    # checksum_url pointing at an image by mistake: refused before it fills the disk.
    server.resources["/12/latest/SHA512SUMS"] = Resource(b"x" * (MAX_CHECKSUM_FILE + 1))
    with pytest.raises(ImageSourceError, match="larger than 4 MiB: not a checksum file"):
        cache.ensure(cfg.images["img"])
    assert [p.name for p in cache.dir.iterdir() if not p.name.endswith(".lock")] == []


def test_refresh_reads_the_checksum_file_again_and_follows_a_new_release(
    server: Server, tmp_path: Path
) -> None:
    image = server.resources[f"/12/latest/{NAME}"] = Resource(BODY)
    sums = server.resources["/12/latest/SHA512SUMS"] = Resource(_sums((BODY, NAME)))
    cache, cfg = _cache(tmp_path, server, refresh_interval=3600)
    entry = cfg.images["img"]
    path = cache.ensure(entry)

    def age() -> None:  # pretend the last look was long ago
        side = path.with_name(path.name + ".meta")
        meta = json.loads(side.read_text())
        meta["fetched_at"] -= 7200
        side.write_text(json.dumps(meta))

    age()
    assert cache.ensure(entry).read_bytes() == BODY
    assert server.bytes_served(f"/12/latest/{NAME}") == len(BODY)  # same digest: kept
    new = os.urandom(len(BODY))
    image.body, sums.body = new, _sums((new, NAME))  # "latest" moved on upstream
    age()
    assert cache.ensure(entry).read_bytes() == new
    assert (cache.meta(path) or {})["listed"]["hexdigest"] == hashlib.sha512(new).hexdigest()
    # The mirror is down: the cached copy stays in use.
    del server.resources["/12/latest/SHA512SUMS"]
    age()
    assert cache.ensure(entry).read_bytes() == new


def test_local_checksum_files_only_from_the_image_directories(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / NAME).write_bytes(BODY)
    (images / "SHA256SUMS").write_text(f"{hashlib.sha256(BODY).hexdigest()} *{NAME}\n")
    outside = tmp_path / "SHA256SUMS"
    outside.write_text((images / "SHA256SUMS").read_text())
    base = {
        "paths": {"cache_dir": str(tmp_path / "cache")},
        "disks": {"reserve_gib": 0},
        "cache": {"image_dirs": [str(images)]},
    }
    entry = {"source": f"file://{images / NAME}", "checksum_url": f"file://{images}/SHA256SUMS"}
    cfg = config.parse({**base, "images": {"img": entry}})
    assert ImageCache(cfg).ensure(cfg.images["img"]).read_bytes() == BODY
    cfg = config.parse({**base, "images": {"img": entry | {"checksum_url": f"file://{outside}"}}})
    with pytest.raises(ImageError, match=r"checksum_url .* is outside the image"):
        ImageCache(cfg).ensure(cfg.images["img"])


def test_a_dead_fetchers_checksum_file_is_swept(tmp_path: Path, server: Server) -> None:
    cache, cfg = _cache(tmp_path, server)
    cache.dir.mkdir(parents=True)
    final = cache.path_for(cfg.images["img"])
    dead = 2**22 + 1  # above pid_max: no such process
    left = [final.with_name(f".{final.name}.sums.{dead}{s}") for s in ("", ".part")]
    for path in left:
        path.write_text("x")
    mine = final.with_name(f".{final.name}.sums.{os.getpid()}")  # a live fetcher's
    mine.write_text("x")
    swept = cache.sweep(older_than=3600, now=0)
    assert sorted((s.path, s.what) for s in swept) == sorted((p, "checksum file") for p in left)
    assert mine.exists() and not any(p.exists() for p in left)
