"""The per-node image cache: one verified copy of each remote image, shared by all jobs.

Layout under ``[paths].cache_dir/images/`` (root-owned, files 0644, never written once in
place)::

    NAME-KEY.img          a verified image (KEY: first 16 hex digits of its checksum, or
                          of its URL when the admin disabled verification)
    NAME-KEY.img.lock     flock(2) held by the one process fetching it (single flight)
    .NAME-KEY.img.part    the partial download, resumed by whoever fetches next
    NAME-KEY.img.used     its mtime is the image's last use (LRU eviction)
    NAME-KEY.img.jobs/    one empty file per job using it: never evicted while non-empty

Single flight: the fetching process holds an exclusive ``flock`` on the lock file; others
block on it and find the image in place when they get it. A fetcher that dies loses the
lock with its life (the kernel releases it) and the next process resumes its partial file.
A fetcher that hangs is noticed because its partial file stops growing for
``[cache].stall_timeout``: a waiter then fetches on its own into a separate partial file;
both end in an atomic rename of identical, verified content.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmbatch.config import Config, ImageConfig
from vmbatch.errors import ImageError
from vmbatch.images.download import Checksum, Progress, compression, fetch, file_digest
from vmbatch.state import safe_job_id

log = logging.getLogger(__name__)

#: How often a waiting process looks at the fetcher's progress.
_POLL = 0.5


def is_cached_source(entry: ImageConfig) -> bool:
    """True for sources fetched into the cache (http, https, file URLs)."""
    return entry.source.startswith(("http://", "https://", "file://"))


def _side(path: Path, suffix: str) -> Path:
    """A sidecar of a cached image: ``.lock``, ``.used`` or ``.jobs`` (see the layout)."""
    return path.with_name(path.name + suffix)


def checksum_of(entry: ImageConfig) -> Checksum | None:
    if entry.sha256:
        return Checksum("sha256", entry.sha256.lower())
    if entry.sha512:
        return Checksum("sha512", entry.sha512.lower())
    return None


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What ``vmbatch image list`` shows about one cached file."""

    path: Path
    size: int
    last_used: float | None
    jobs: tuple[str, ...]


class ImageCache:
    """The cache directory of one node."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dir = cfg.paths.cache_dir / "images"

    def path_for(self, entry: ImageConfig) -> Path:
        sums = checksum_of(entry)
        key = (
            sums.hexdigest[:16] if sums else hashlib.sha256(entry.source.encode()).hexdigest()[:16]
        )
        return self.dir / f"{entry.name}-{key}.img"

    # -- fetching ---------------------------------------------------------------------

    def ensure(self, entry: ImageConfig, progress: Progress | None = None) -> Path:
        """The cached path of ``entry``, fetching it first if needed (single flight)."""
        final = self.path_for(entry)
        if final.exists():
            return final
        self._check_file_url(entry)
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        lock_path = _side(final, ".lock")
        part = final.with_name(f".{final.name}.part")
        with lock_path.open("a") as lock:
            if not self._acquire(lock, part, entry):
                # The holder stalled: fetch beside it, into our own partial file.
                own = final.with_name(f".{final.name}.part.{os.getpid()}")
                try:
                    return self._fetch(entry, final, own, progress)
                finally:
                    own.unlink(missing_ok=True)
            try:
                if final.exists():  # another process fetched it while we waited
                    return final
                return self._fetch(entry, final, part, progress)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _acquire(self, lock: IO[str], part: Path, entry: ImageConfig) -> bool:
        """Take the fetch lock; False if its holder made no progress for stall_timeout."""
        fd = lock.fileno()
        last_size, last_change = -1, time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            size = part.stat().st_size if part.exists() else 0
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change > self.cfg.cache.stall_timeout:
                log.warning(
                    "image %s: the process fetching it made no progress for %.0fs;"
                    " fetching it separately",
                    entry.name,
                    self.cfg.cache.stall_timeout,
                )
                return False
            time.sleep(_POLL)

    def _fetch(
        self, entry: ImageConfig, final: Path, part: Path, progress: Progress | None
    ) -> Path:
        log.info("image %s: fetching %s", entry.name, entry.source)
        return fetch(
            entry.name,
            entry.source,
            final,
            checksum=checksum_of(entry),
            connect_timeout=self.cfg.cache.connect_timeout,
            read_timeout=self.cfg.cache.read_timeout,
            progress=progress,
            part=part,
        )

    def _check_file_url(self, entry: ImageConfig) -> None:
        if not entry.source.startswith("file://"):
            return
        real = Path(os.path.realpath(entry.source[len("file://") :]))
        roots = self.cfg.cache.image_dirs
        if not any(real.is_relative_to(os.path.realpath(r)) for r in roots):
            raise ImageError(
                f"image {entry.name!r}: {entry.source} is outside the image directories"
                f" ({', '.join(str(r) for r in roots)})",
                hint="move the file there or add its directory to [cache].image_dirs",
            )

    # -- use tracking and eviction ----------------------------------------------------

    @contextlib.contextmanager
    def in_use(self, path: Path, job_id: str) -> Iterator[None]:
        """Mark ``path`` as used by ``job_id`` for the duration of the block."""
        marker = self.mark_used(path, job_id)
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)

    def mark_used(self, path: Path, job_id: str) -> Path:
        jobs = _side(path, ".jobs")
        jobs.mkdir(mode=0o755, exist_ok=True)
        marker = jobs / safe_job_id(job_id)
        marker.touch()
        stamp = _side(path, ".used")
        stamp.touch()
        return marker

    def entries(self) -> list[CacheEntry]:
        if not self.dir.is_dir():
            return []
        result = []
        for p in sorted(self.dir.glob("*.img")):
            stamp = _side(p, ".used")
            jobs = _side(p, ".jobs")
            result.append(
                CacheEntry(
                    p,
                    p.stat().st_size,
                    stamp.stat().st_mtime if stamp.exists() else None,
                    tuple(sorted(j.name for j in jobs.iterdir())) if jobs.is_dir() else (),
                )
            )
        return result

    def remove(self, path: Path, *, force: bool = False) -> bool:
        """Delete one cached image unless a job uses it; True if it was removed."""
        jobs = _side(path, ".jobs")
        if not force and jobs.is_dir() and any(jobs.iterdir()):
            return False
        lock_path = _side(path, ".lock")
        with lock_path.open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being fetched right now: leave it alone
            path.unlink(missing_ok=True)
            _side(path, ".used").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                jobs.rmdir()
            lock_path.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)
        return True

    def prune(self) -> list[Path]:
        """Evict least recently used images not in use until under ``max_size_gib``."""
        cap = self.cfg.cache.max_size_gib * 2**30
        if cap <= 0:
            return []
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed = []
        for e in sorted(entries, key=lambda e: e.last_used or 0.0):
            if total <= cap:
                break
            if not e.jobs and self.remove(e.path):
                total -= e.size
                removed.append(e.path)
        return removed

    def verify(self, entry: ImageConfig) -> bool | None:
        """Re-hash the cached copy; a mismatch deletes it (the next use fetches it again).

        None if it is not cached or has no checksum to compare."""
        path = self.path_for(entry)
        sums = checksum_of(entry)
        if not path.exists() or sums is None or compression(entry.source) is not None:
            return None
        if file_digest(path, sums.algorithm) == sums.hexdigest:
            return True
        log.error("image %s: cached copy %s is corrupt; removing it", entry.name, path)
        self.remove(path, force=True)
        return False
