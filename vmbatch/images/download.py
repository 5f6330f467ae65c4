"""Fetch a remote image over HTTP(S) into the cache: streamed, resumable, verified, atomic.

Contract:
- The body streams into ``.<name>.part`` next to the destination. If a partial file exists,
  the request asks ``Range: bytes=N-`` (RFC 9110, section 14.2); a ``206`` whose
  ``Content-Range`` starts at N is appended, a ``200`` starts over (the server ignored the
  range), a ``416`` starts over too (the partial file is larger than the resource).
- A partial file is only resumed across processes when a checksum will verify the result;
  without one it is discarded (it may belong to an older version of the file). Within one
  fetch, retries send ``If-Range`` with the first answer's strong ETag or Last-Modified
  (RFC 9110, section 13.1.5) so a file that changed meanwhile is sent whole.
- Connection errors, read timeouts, 408, 429 and 5xx answers are retried under
  :data:`~vmbatch.retry.DOWNLOAD_POLICY`; each retry resumes from what arrived. Other 4xx
  answers are permanent (:class:`~vmbatch.errors.ImageSourceError`).
- A revalidation (``validators`` given) sends ``If-None-Match``/``If-Modified-Since``
  (RFC 9110, sections 13.1.2 and 13.1.3); ``304 Not Modified`` leaves everything as it is.
- Before writing, ``room(n)`` is told how many bytes will arrive, so the cache can evict or
  refuse; running out of space is a :class:`~vmbatch.errors.DiskSpaceError`.
- Redirects may only lead to http/https (requests refuses other schemes; we say so).
- The finished file is checked against the configured sha256/sha512 before anything else
  sees it; a mismatch deletes it. Compressed sources (``.gz``, ``.xz``, ``.bz2``, decided by
  the URL path) are verified as downloaded, then decompressed.
- The SHA-256 of the final (unpacked) file is computed on the way and handed to
  ``before_rename`` with the validators, so the cache can record them next to the file and
  verify unpacked copies later.
- Only a verified, complete file is renamed (atomically) to the destination.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import logging
import lzma
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import requests

from vmbatch import faults
from vmbatch.config import DebugConfig
from vmbatch.errors import (
    DiskSpaceError,
    ImageDownloadError,
    ImageSourceError,
    ImageVerifyError,
)
from vmbatch.retry import DOWNLOAD_POLICY

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
#: Network reads: a connection that breaks loses at most the chunk being read (urllib3
#: discards a partial read). 256 KiB measured ~30% faster than 64 KiB on loopback (per-read
#: overhead in requests/urllib3) and loses little on a break (bench/images.py).
NET_CHUNK = 256 * 1024
#: Called with (bytes so far, total bytes or None) as data arrives.
Progress = Callable[[int, int | None], None]
#: Told the number of bytes about to be written; raises to refuse.
Room = Callable[[int], None]
#: Answers that are worth another try although they are 4xx (RFC 9110, 15.5.9; RFC 6585).
_TRANSIENT_4XX = (408, 429)

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


@dataclass(frozen=True, slots=True)
class Validators:
    """What the server said identifies the version it sent (RFC 9110, section 8.8)."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def of(cls, resp: requests.Response) -> Validators:
        return cls(resp.headers.get("ETag"), resp.headers.get("Last-Modified"))

    def conditional(self) -> dict[str, str]:
        """Headers asking "send it only if it changed"."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers

    def if_range(self) -> str | None:
        """The ``If-Range`` value, if any (a weak ETag is not allowed there)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What a fetch produced: the final file's SHA-256 and the server's validators."""

    sha256: str | None
    size: int
    validators: Validators
    not_modified: bool = False
    #: Bytes received from the source, over every attempt (a resume receives the rest).
    transferred: int = 0


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
    validators: Validators | None = None,
    room: Room | None = None,
    before_rename: Callable[[FetchResult], None] | None = None,
    debug: DebugConfig | None = None,
    key: str = "source",
) -> FetchResult:
    """Fetch ``url`` (http, https or file) to ``dest``: verified, unpacked, renamed atomically.

    ``part`` is the partial file to write and resume (default ``.<dest name>.part``).
    With ``validators`` the request is conditional and may return ``not_modified``.
    ``debug`` arms the fault points inside the transfer loops (:mod:`vmbatch.faults`).
    ``key`` is the catalog key that holds ``url`` (``source``, ``checksum_url``), for hints.
    """
    scheme = urlsplit(url).scheme
    part = part or dest.with_name(f".{dest.name}.part")
    if checksum is None:
        part.unlink(missing_ok=True)  # unverifiable: never stitch onto an unknown partial
    if scheme == "file":
        transferred = _copy_local(name, Path(urlsplit(url).path), part, progress, room, debug)
        seen = Validators()
    elif scheme in ("http", "https"):
        own = session is None
        dl = _Download(
            name,
            url,
            part,
            session or requests.Session(),
            (connect_timeout, read_timeout),
            progress,
            room,
            resumable=checksum is not None,
            validators=validators,
            debug=debug,
            key=key,
        )
        try:
            for attempt in DOWNLOAD_POLICY.retrying():
                with attempt:
                    dl.attempt()
        finally:
            if own:
                dl.sess.close()
        if dl.not_modified:
            return FetchResult(
                None, 0, validators or Validators(), not_modified=True, transferred=dl.received
            )
        seen = dl.seen or Validators()
        transferred = dl.received
    else:
        raise ImageDownloadError(f"image {name!r}: {url} is not an http(s) or file URL")
    return _finish(name, url, part, dest, checksum, seen, before_rename, transferred)


def _finish(
    name: str,
    url: str,
    part: Path,
    dest: Path,
    checksum: Checksum | None,
    seen: Validators,
    before_rename: Callable[[FetchResult], None] | None,
    transferred: int = 0,
) -> FetchResult:
    sha256: str | None = None
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
        if checksum.algorithm == "sha256":
            sha256 = got
    comp = compression(url)
    ready = part
    if comp is not None:
        ready = part.with_name(part.name + ".unpacked")
        try:
            sha256 = _decompress(name, part, ready, comp)
        finally:
            part.unlink()
    elif sha256 is None:
        sha256 = file_digest(ready, "sha256")
    ready.chmod(0o644)
    result = FetchResult(sha256, ready.stat().st_size, seen, transferred=transferred)
    try:
        if before_rename is not None:
            before_rename(result)
    except BaseException:
        ready.unlink(missing_ok=True)
        raise
    ready.replace(dest)
    return result


def _no_space(name: str, path: Path, exc: OSError) -> DiskSpaceError:
    return DiskSpaceError(
        f"image {name!r}: no space left on {path.parent} while writing it",
        hint="free space there or lower [cache].max_size_gib",
    )


def _copy_local(
    name: str,
    src: Path,
    part: Path,
    progress: Progress | None,
    room: Room | None,
    debug: DebugConfig | None = None,
) -> int:
    """Copy a local (e.g. NFS-mounted) file into ``part``; a local copy is never resumed.
    Returns the bytes copied."""
    try:
        total = src.stat().st_size
        if room is not None:
            room(total)
        with src.open("rb") as inp, part.open("wb") as out:
            done = 0
            while chunk := inp.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                faults.point(debug, "image.copy.chunk")
                if progress is not None:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        return done
    except OSError as exc:
        part.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise _no_space(name, part, exc) from exc
        raise ImageDownloadError(
            f"image {name!r}: cannot copy {src}: {exc.strerror}",
            hint="check that the file exists and its file system is mounted",
        ) from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise


class _Download:
    """One HTTP(S) fetch across its retries; :meth:`attempt` is one try."""

    def __init__(
        self,
        name: str,
        url: str,
        part: Path,
        sess: requests.Session,
        timeout: tuple[float, float],
        progress: Progress | None,
        room: Room | None,
        *,
        resumable: bool,
        validators: Validators | None,
        debug: DebugConfig | None = None,
        key: str = "source",
    ) -> None:
        self.name, self.url, self.part, self.sess = name, url, part, sess
        self.key = key
        self.timeout, self.progress, self.room = timeout, progress, room
        #: A partial file from elsewhere may be resumed (a checksum will catch a mix-up).
        self.resumable = resumable
        self.validators = validators
        self.debug = debug
        #: Validators of the first full answer in this fetch, for If-Range on retries.
        self.seen: Validators | None = None
        self.not_modified = False
        #: Bytes received over every attempt.
        self.received = 0

    def _request_headers(self, have: int) -> dict[str, str]:
        headers: dict[str, str] = {}
        if not have and self.validators is not None:
            headers.update(self.validators.conditional())
        if have:
            headers["Range"] = f"bytes={have}-"
            tag = self.seen.if_range() if self.seen else None
            if tag:
                headers["If-Range"] = tag
        return headers

    def attempt(self) -> None:
        """One try: resume ``part`` from where it ends, or start over."""
        name, url, part = self.name, self.url, self.part
        have = part.stat().st_size if part.exists() else 0
        if have and not self.resumable and (self.seen is None or not self.seen.if_range()):
            part.unlink()  # no checksum and no validator: resuming could mix two versions
            have = 0
        try:
            resp = self.sess.get(
                url, headers=self._request_headers(have), stream=True, timeout=self.timeout
            )
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
            self._check_status(resp, have)
            if self.not_modified:
                return
            append = resp.status_code == 206 and _range_start(resp) == have
            if not append:
                have = 0
                self.seen = Validators.of(resp)
            total = _total(resp, have)
            if self.room is not None and total is not None:
                self.room(total - have)
            self._receive(resp, append, have, total)

    def _check_status(self, resp: requests.Response, have: int) -> None:
        name, url, code = self.name, self.url, resp.status_code
        what = f"image {name!r}: {url} answered {code} {resp.reason}"
        if code == 304 and self.validators is not None and not have:
            self.not_modified = True
        elif code == 416 and have:
            self.part.unlink()
            raise ImageDownloadError(
                f"image {name!r}: stale partial file, starting over", transient=True
            )
        elif code >= 500 or code in _TRANSIENT_4XX:
            raise ImageDownloadError(what, transient=True)
        elif 400 <= code < 500:
            raise ImageSourceError(
                what, hint=f"fix [images.{name}].{self.key} or the server; retrying will not help"
            )
        elif code not in (200, 206):
            raise ImageDownloadError(what, hint="check the URL in the image catalog")

    def _receive(self, resp: requests.Response, append: bool, have: int, total: int | None) -> None:
        name, url, part = self.name, self.url, self.part
        done = have
        last_log = time.monotonic()
        try:
            with part.open("ab" if append else "wb") as fh:
                try:
                    for chunk in resp.iter_content(NET_CHUNK):
                        fh.write(chunk)
                        done += len(chunk)
                        self.received += len(chunk)
                        faults.point(self.debug, "image.download.chunk")
                        if self.progress is not None:
                            self.progress(done, total)
                        if time.monotonic() - last_log > 10:
                            last_log = time.monotonic()
                            log.info("image %s: %d of %s bytes", name, done, total or "?")
                except requests.RequestException as exc:  # reset, stall, short body
                    raise ImageDownloadError(
                        f"image {name!r}: download from {url} broke off after {done} bytes: {exc}",
                        transient=True,
                    ) from exc
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                part.unlink(missing_ok=True)
                raise _no_space(name, part, exc) from exc
            raise
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


def _decompress(name: str, src: Path, dst: Path, comp: str) -> str:
    """Unpack ``src`` into ``dst``; return the SHA-256 of what was written."""
    h = hashlib.sha256()
    try:
        with src.open("rb") as raw, _DECOMPRESSORS[comp](raw) as inp, dst.open("wb") as out:
            while chunk := inp.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except (OSError, EOFError, lzma.LZMAError) as exc:
        dst.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise _no_space(name, dst, exc) from exc
        raise ImageVerifyError(f"image {name!r}: cannot decompress ({comp}): {exc}") from exc
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return h.hexdigest()
