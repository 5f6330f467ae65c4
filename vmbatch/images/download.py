"""Fetch a remote image over HTTP(S) into the cache: streamed, resumable, verified, atomic.

Contract:
- The body streams into ``.<name>.part`` next to the destination. If a partial file exists,
  the request asks ``Range: bytes=N-`` (RFC 9110, section 14.2); a ``206`` whose
  ``Content-Range`` starts at N is appended, a ``200`` starts over (the server ignored the
  range), a ``416`` starts over too (the partial file is larger than the resource).
- Connection errors, read timeouts and 5xx answers are retried under
  :data:`~vmbatch.retry.DOWNLOAD_POLICY`; each retry resumes from what arrived.
- Redirects may only lead to http/https (requests refuses other schemes; we say so).
- The finished file is checked against the configured sha256/sha512 before anything else
  sees it; a mismatch deletes it. Compressed sources (``.gz``, ``.xz``, ``.bz2``, decided by
  the URL path) are verified as downloaded, then decompressed.
- Only a verified, complete file is renamed (atomically) to the destination.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import logging
import lzma
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import requests

from vmbatch.errors import ImageDownloadError, ImageVerifyError
from vmbatch.retry import DOWNLOAD_POLICY

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
#: Network reads: a connection that breaks loses at most the chunk being read (urllib3
#: discards a partial read), so keep it small; 64 KiB costs nothing measurable.
NET_CHUNK = 64 * 1024
#: Called with (bytes so far, total bytes or None) as data arrives.
Progress = Callable[[int, int | None], None]

_DECOMPRESSORS: dict[str, Callable[[IO[bytes]], io.BufferedIOBase]] = {
    ".gz": lambda f: gzip.GzipFile(fileobj=f),
    ".xz": lambda f: lzma.LZMAFile(f),
    ".bz2": lambda f: bz2.BZ2File(f),
}


@dataclass(frozen=True, slots=True)
class Checksum:
    """An expected digest: ``algorithm`` is "sha256" or "sha512", ``hexdigest`` lower-case."""

    algorithm: str
    hexdigest: str


def compression(url: str) -> str | None:
    """The compression suffix of the URL's path (".gz", ".xz", ".bz2"), if any."""
    suffix = Path(urlsplit(url).path).suffix.lower()
    return suffix if suffix in _DECOMPRESSORS else None


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    name: str,
    url: str,
    dest: Path,
    *,
    checksum: Checksum | None,
    connect_timeout: float = 10.0,
    read_timeout: float = 30.0,
    progress: Progress | None = None,
    session: requests.Session | None = None,
    part: Path | None = None,
) -> Path:
    """Fetch ``url`` (http, https or file) to ``dest``: verified, unpacked, renamed atomically.

    ``part`` is the partial file to write and resume (default ``.<dest name>.part``).
    """
    scheme = urlsplit(url).scheme
    part = part or dest.with_name(f".{dest.name}.part")
    if scheme == "file":
        _copy_local(name, Path(urlsplit(url).path), part, progress)
    elif scheme in ("http", "https"):
        own = session is None
        sess = session or requests.Session()
        try:
            for attempt in DOWNLOAD_POLICY.retrying():
                with attempt:
                    _transfer(name, url, part, sess, (connect_timeout, read_timeout), progress)
        finally:
            if own:
                sess.close()
    else:
        raise ImageDownloadError(f"image {name!r}: {url} is not an http(s) or file URL")
    return _finish(name, url, part, dest, checksum)


def _finish(name: str, url: str, part: Path, dest: Path, checksum: Checksum | None) -> Path:
    if checksum is not None:
        got = file_digest(part, checksum.algorithm)
        if got != checksum.hexdigest.lower():
            part.unlink(missing_ok=True)
            raise ImageVerifyError(
                f"image {name!r}: {checksum.algorithm} of the download from {url} is {got},"
                f" expected {checksum.hexdigest}",
                hint="the file on the server changed or is corrupt; fix the checksum in the"
                " catalog only if the new file is trusted",
            )
    comp = compression(url)
    ready = part
    if comp is not None:
        ready = part.with_name(part.name + ".unpacked")
        try:
            _decompress(name, part, ready, comp)
        finally:
            part.unlink()
    ready.chmod(0o644)
    ready.replace(dest)
    return dest


def _copy_local(name: str, src: Path, part: Path, progress: Progress | None) -> None:
    """Copy a local (e.g. NFS-mounted) file into ``part``; a local copy is never resumed."""
    try:
        total = src.stat().st_size
        with src.open("rb") as inp, part.open("wb") as out:
            done = 0
            while chunk := inp.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise ImageDownloadError(
            f"image {name!r}: cannot copy {src}: {exc.strerror}",
            hint="check that the file exists and its file system is mounted",
        ) from exc


def _transfer(
    name: str,
    url: str,
    part: Path,
    sess: requests.Session,
    timeout: tuple[float, float],
    progress: Progress | None,
) -> None:
    """One attempt: resume ``part`` from where it ends, or start over."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = sess.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.exceptions.InvalidSchema as exc:
        raise ImageDownloadError(
            f"image {name!r}: {url} redirected to a non-HTTP location ({exc})",
            hint="only http and https are followed; fix the image URL",
        ) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise ImageDownloadError(
            f"image {name!r}: cannot download {url}: {exc}", transient=True
        ) from exc
    with resp:
        if resp.status_code == 416 and have:
            part.unlink()
            raise ImageDownloadError(
                f"image {name!r}: stale partial file, starting over", transient=True
            )
        if resp.status_code >= 500:
            raise ImageDownloadError(
                f"image {name!r}: {url} answered {resp.status_code} {resp.reason}",
                transient=True,
            )
        if resp.status_code not in (200, 206):
            raise ImageDownloadError(
                f"image {name!r}: {url} answered {resp.status_code} {resp.reason}",
                hint="check the URL in the image catalog",
            )
        append = resp.status_code == 206 and _range_start(resp) == have
        if not append:
            have = 0
        total = _total(resp, have)
        done = have
        last_log = time.monotonic()
        with part.open("ab" if append else "wb") as fh:
            try:
                for chunk in resp.iter_content(NET_CHUNK):
                    fh.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                    if time.monotonic() - last_log > 10:
                        last_log = time.monotonic()
                        log.info("image %s: %d of %s bytes", name, done, total or "?")
            except requests.RequestException as exc:  # connection reset, stall, short body
                raise ImageDownloadError(
                    f"image {name!r}: download from {url} broke off after {done} bytes: {exc}",
                    transient=True,
                ) from exc
            fh.flush()
            os.fsync(fh.fileno())
        if total is not None and done != total:
            raise ImageDownloadError(
                f"image {name!r}: download from {url} ended after {done} of {total} bytes",
                transient=True,
            )


def _range_start(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Range", "")  # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _total(resp: requests.Response, have: int) -> int | None:
    length = resp.headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    return have + int(length) if resp.status_code == 206 else int(length)


def _decompress(name: str, src: Path, dst: Path, comp: str) -> None:
    try:
        with src.open("rb") as raw, _DECOMPRESSORS[comp](raw) as inp, dst.open("wb") as out:
            shutil.copyfileobj(inp, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
    except (OSError, EOFError, lzma.LZMAError) as exc:
        dst.unlink(missing_ok=True)
        raise ImageVerifyError(f"image {name!r}: cannot decompress ({comp}): {exc}") from exc
