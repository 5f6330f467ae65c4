"""Image downloads against a real HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.httpserver import Resource, Server, serve
from vmbatch.errors import (
    DiskSpaceError,
    Disposition,
    ImageDownloadError,
    ImageSourceError,
    ImageVerifyError,
)
from vmbatch.images.download import NET_CHUNK, Checksum, Validators, fetch

BODY = os.urandom(3 * 1024 * 1024 + 123)
SHA = Checksum("sha256", hashlib.sha256(BODY).hexdigest())


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as s:
        yield s


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_plain_download_is_verified_and_atomic(server: Server, tmp_path: Path) -> None:
    server.resources["/img.qcow2"] = Resource(BODY)
    seen: list[int] = []
    dest = tmp_path / "demo.qcow2"
    result = fetch(
        "demo",
        server.url("/img.qcow2"),
        dest,
        checksum=SHA,
        progress=lambda done, total: seen.append(done),
    )
    assert dest.read_bytes() == BODY
    assert result.sha256 == SHA.hexdigest and result.size == len(BODY)
    assert result.validators.etag == server.resources["/img.qcow2"].etag
    assert _leftovers(tmp_path) == ["demo.qcow2"]
    assert dest.stat().st_mode & 0o777 == 0o644
    assert seen[-1] == len(BODY)


def test_dropped_connection_resumes_with_range(server: Server, tmp_path: Path) -> None:
    server.resources["/img"] = Resource(BODY, drop_after=1_000_000)
    fetch("demo", server.url("/img"), tmp_path / "demo", checksum=SHA)
    assert (tmp_path / "demo").read_bytes() == BODY
    assert [h.status for h in server.wait_idle()] == [200, 206]
    # Resumed where the data ended, minus at most the one read that broke off.
    resumed_at = int(str(server.wait_idle()[1].range).removeprefix("bytes=").rstrip("-"))
    assert 1_000_000 - NET_CHUNK < resumed_at <= 1_000_000
    server.wait_idle()
    assert server.bytes_served("/img") <= len(BODY) + NET_CHUNK


def test_server_without_range_support_restarts(server: Server, tmp_path: Path) -> None:
    server.resources["/img"] = Resource(BODY, ranges=False, drop_after=500_000)
    fetch("demo", server.url("/img"), tmp_path / "demo", checksum=SHA)
    assert (tmp_path / "demo").read_bytes() == BODY
    assert [h.status for h in server.wait_idle()] == [200, 200]


def test_500_then_200_is_retried(server: Server, tmp_path: Path) -> None:
    server.resources["/img"] = Resource(BODY, fail_first=2)
    fetch("demo", server.url("/img"), tmp_path / "demo", checksum=SHA)
    assert [h.status for h in server.wait_idle()] == [500, 500, 200]


def test_stalled_transfer_times_out_and_resumes(server: Server, tmp_path: Path) -> None:
    server.resources["/img"] = Resource(BODY, stall_after=1_048_576, stall_seconds=3)
    fetch("demo", server.url("/img"), tmp_path / "demo", checksum=SHA, read_timeout=0.5)
    assert (tmp_path / "demo").read_bytes() == BODY
    # The stalled request is still asleep in the server; the resumed one was served.
    hits = server.wait_idle()
    assert any(h.status == 206 and h.range == "bytes=1048576-" for h in hits)


@pytest.mark.parametrize("status", [403, 404, 410])
def test_permanent_client_error_is_not_retried_and_aborts_the_job(
    server: Server, tmp_path: Path, status: int
) -> None:
    server.resources["/img"] = Resource(BODY, status=status)
    with pytest.raises(ImageSourceError, match=rf"image 'demo': .*/img answered {status}") as info:
        fetch("demo", server.url("/img"), tmp_path / "demo", checksum=SHA)
    assert info.value.disposition is Disposition.ABORT_JOB  # requeueing cannot help
    assert "[images.demo].source" in str(info.value)
    assert len(server.wait_idle()) == 1
    assert _leftovers(tmp_path) == []


def test_429_too_many_requests_is_retried(server: Server, tmp_path: Path) -> None:
    server.resources["/img"] = Resource(BODY, status=429)
    with pytest.raises(ImageDownloadError, match="answered 429") as info:
        fetch("demo", server.url("/img"), tmp_path / "demo", checksum=SHA)
    assert info.value.transient
    assert len(server.wait_idle()) > 1


def test_file_changed_between_retries_is_fetched_whole_not_stitched(
    server: Server, tmp_path: Path
) -> None:
    new = os.urandom(len(BODY))
    server.resources["/img"] = Resource(BODY, drop_after=1_000_000, replace_after_drop=new)
    result = fetch("demo", server.url("/img"), tmp_path / "demo", checksum=None)
    assert (tmp_path / "demo").read_bytes() == new
    assert result.sha256 == hashlib.sha256(new).hexdigest()
    _first, retry = server.wait_idle()
    assert retry.if_range == Resource(BODY).etag and retry.range is not None
    assert retry.status == 200  # the validator no longer matched: whole new file


def test_unverified_partial_from_another_process_is_not_resumed(
    server: Server, tmp_path: Path
) -> None:
    server.resources["/img"] = Resource(BODY)
    (tmp_path / ".demo.part").write_bytes(b"y" * 1000)  # unknown origin, no checksum
    fetch("demo", server.url("/img"), tmp_path / "demo", checksum=None)
    assert (tmp_path / "demo").read_bytes() == BODY
    assert [h.range for h in server.wait_idle()] == [None]


def test_conditional_request_not_modified_leaves_everything(server: Server, tmp_path: Path) -> None:
    res = server.resources["/img"] = Resource(BODY)
    (tmp_path / "demo").write_bytes(b"cached copy")
    result = fetch(
        "demo",
        server.url("/img"),
        tmp_path / "demo",
        checksum=None,
        validators=Validators(res.etag, res.last_modified),
    )
    assert result.not_modified
    assert (tmp_path / "demo").read_bytes() == b"cached copy"
    [hit] = server.wait_idle()
    assert (hit.status, hit.if_none_match) == (304, res.etag)
    assert _leftovers(tmp_path) == ["demo"]


def test_room_is_asked_before_writing_and_can_refuse(server: Server, tmp_path: Path) -> None:
    server.resources["/img"] = Resource(BODY)
    asked: list[int] = []

    def room(need: int) -> None:
        asked.append(need)
        raise DiskSpaceError("no room")

    with pytest.raises(DiskSpaceError):
        fetch("demo", server.url("/img"), tmp_path / "demo", checksum=SHA, room=room)
    assert asked == [len(BODY)]
    assert _leftovers(tmp_path) == []


def test_wrong_checksum_is_rejected_and_not_kept(server: Server, tmp_path: Path) -> None:
    server.resources["/img"] = Resource(BODY)
    bad = Checksum("sha256", "0" * 64)
    with pytest.raises(ImageVerifyError, match=r"image 'demo': sha256 .* expected 0000"):
        fetch("demo", server.url("/img"), tmp_path / "demo", checksum=bad)
    assert _leftovers(tmp_path) == []


def test_redirect_to_a_file_url_is_refused(server: Server, tmp_path: Path) -> None:
    server.resources["/img"] = Resource(b"", redirect="file:///etc/shadow")
    with pytest.raises(ImageDownloadError, match="redirected to a non-HTTP location"):
        fetch("demo", server.url("/img"), tmp_path / "demo", checksum=None)
    assert _leftovers(tmp_path) == []


def test_non_http_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageDownloadError, match="is not an http"):
        fetch("demo", "ftp://127.0.0.1/x", tmp_path / "demo", checksum=None)


@pytest.mark.parametrize("suffix,pack", [(".gz", gzip.compress), (".xz", lzma.compress)])
def test_compressed_source_is_verified_then_unpacked(
    server: Server, tmp_path: Path, suffix: str, pack: object
) -> None:
    packed = pack(BODY)  # type: ignore[operator]
    server.resources[f"/img.qcow2{suffix}"] = Resource(packed)
    checksum = Checksum("sha256", hashlib.sha256(packed).hexdigest())
    result = fetch("demo", server.url(f"/img.qcow2{suffix}"), tmp_path / "demo", checksum=checksum)
    assert (tmp_path / "demo").read_bytes() == BODY
    assert result.sha256 == SHA.hexdigest  # of the unpacked file, recorded for verify
    assert _leftovers(tmp_path) == ["demo"]


def test_corrupt_compressed_source_is_refused(server: Server, tmp_path: Path) -> None:
    server.resources["/img.gz"] = Resource(b"not gzip at all")
    with pytest.raises(ImageVerifyError, match="cannot decompress"):
        fetch("demo", server.url("/img.gz"), tmp_path / "demo", checksum=None)
    assert _leftovers(tmp_path) == []


def test_stale_partial_file_larger_than_resource_starts_over(
    server: Server, tmp_path: Path
) -> None:
    server.resources["/img"] = Resource(BODY)
    (tmp_path / ".demo.part").write_bytes(b"x" * (len(BODY) + 10))
    fetch("demo", server.url("/img"), tmp_path / "demo", checksum=SHA)
    assert (tmp_path / "demo").read_bytes() == BODY
    assert [h.status for h in server.wait_idle()] == [416, 200]
