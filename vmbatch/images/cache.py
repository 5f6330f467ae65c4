"""The per-node image cache: one verified copy of each remote image, shared by all jobs.

Layout under ``[paths].cache_dir/images/`` (root-owned, files 0644, never written once in
place)::

    NAME-KEY.img          a verified image (KEY: first 16 hex digits of its checksum, or
                          of its URL when the admin disabled verification)
    NAME-KEY.img.lock     flock(2): shared by a job checking the image is there, exclusive
                          for the one process fetching or removing it
    .NAME-KEY.img.part    the partial download, resumed by whoever fetches next
    NAME-KEY.img.meta     JSON: SHA-256 of the file as stored (also for unpacked copies of
                          compressed sources), the server's ETag/Last-Modified, fetch time
    NAME-KEY.img.used     its mtime is the image's last use (LRU eviction)
    NAME-KEY.img.jobs/    one file per job using it, holding the host's boot id and, on a
                          second line, the process that wrote it (PID:START:BOOT, see
                          :func:`vmbatch.state.process_identity`): an image is never evicted
                          while it has a marker from this boot

Single flight: the fetching process holds an exclusive ``flock`` on the lock file; others
block on it and find the image in place when they get it. A fetcher that dies loses the
lock with its life (the kernel releases it) and the next process resumes its partial file.
A fetcher that hangs is noticed because its partial file stops growing for
``[cache].stall_timeout``: a waiter then fetches on its own into a separate partial file;
both end in an atomic rename of identical, verified content.

No eviction race: a job writes its in-use marker *before* it looks for the image under the
shared lock, and eviction checks the markers only while it holds the exclusive lock. Either
the evictor sees the marker and skips the image, or the job waits for the lock and then finds
the image gone and fetches it again. Markers left by a crash or a reboot are recognized by
their boot id and ignored; markers of this boot whose job is gone are released by the
reaper (:meth:`ImageCache.markers`). Eviction happens when a download needs room (LRU images
not in use go first, until the new image fits under ``[cache].max_size_gib`` and leaves
``[disks].reserve_gib`` free) and on ``vmbatch image prune``.

Left-overs of fetchers that died (:meth:`ImageCache.sweep`, for the reaper): a partial file
is removed once nobody holds its image's lock and it has not changed for a while (until then
it is kept for the next fetch to resume); a fetcher's own partial file (``.part.PID``) and a
metadata temp file (``.meta.PID``) once process PID is gone; a lock file, ``.used``,
``.meta`` or empty ``.jobs/`` whose image is gone, under the image's exclusive lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vmbatch import faults, metrics, state
from vmbatch.config import Config, ImageConfig
from vmbatch.errors import DiskSpaceError, ImageError, ImageSourceError, VmBatchError
from vmbatch.images import checksums
from vmbatch.images.download import (
    Checksum,
    FetchResult,
    Progress,
    Validators,
    compression,
    fetch,
    file_digest,
)
from vmbatch.state import safe_job_id

log = logging.getLogger(__name__)

#: How often a waiting process looks at the fetcher's progress.
_POLL = 0.5


def is_cached_source(entry: ImageConfig) -> bool:
    """True for sources fetched into the cache (http, https, file URLs)."""
    return entry.source.startswith(("http://", "https://", "file://"))


def _side(path: Path, suffix: str) -> Path:
    """A sidecar of a cached image: ``.lock``, ``.meta``, ``.used``, ``.jobs`` (the layout)."""
    return path.with_name(path.name + suffix)


def _try_lock(path: Path, operation: int) -> IO[str] | None:
    """Open and ``flock`` the lock file without blocking; None if someone else holds it.

    A remover unlinks the lock file while holding it; whoever then gets the lock on the old,
    unlinked file retries with the new one (the inode check), so two processes can never
    both believe they hold "the" lock.
    """
    while True:
        fh = path.open("a")
        try:
            fcntl.flock(fh, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        try:
            same = path.stat().st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()


def free_bytes(path: Path) -> int:
    """Space available to unprivileged writers on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


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


@dataclass(frozen=True, slots=True)
class Marker:
    """One in-use marker of this boot: ``job`` (a safe job id) uses ``image``."""

    path: Path
    image: Path
    job: str
    #: The process that wrote it (PID:START:BOOT), None in markers of older versions.
    writer: str | None
    mtime: float


@dataclass(frozen=True, slots=True)
class Swept:
    """A file :meth:`ImageCache.sweep` removed (or would remove), and why."""

    path: Path
    what: str
    why: str


#: A fetcher's own partial file (``.NAME.img.part.PID``, also ``.unpacked``), metadata
#: temp file (``.NAME.img.meta.PID``) or checksum file (``.NAME.img.sums.PID``, also
#: ``.part``): see ``_fetch_locked``, ``_write_meta`` and ``_listed_checksum``.
_OWN_FILE = re.compile(
    r"\.(?P<image>.+\.img)\.(?P<kind>part|meta|sums)\.(?P<pid>[0-9]+)(\.unpacked|\.part)?"
)
#: A checksum file larger than this is not one (a checksum_url pointing at an image).
MAX_CHECKSUM_FILE = 4 * 2**20


def _image_of(name: str) -> str | None:
    """The image file a cache entry belongs to (``X.img`` for ``X.img.lock``,
    ``.X.img.part``, ...); None for a fetcher's own files and anything else."""
    if _OWN_FILE.fullmatch(name):
        return None
    m = re.fullmatch(r"\.?(.+\.img)(\.lock|\.used|\.meta|\.jobs|\.part|\.part\.unpacked)?", name)
    if m is None or (name.startswith(".") != (m[2] in (".part", ".part.unpacked"))):
        return None
    return m[1]


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


class ImageCache:
    """The cache directory of one node."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dir = cfg.paths.cache_dir / "images"

    def path_for(self, entry: ImageConfig) -> Path:
        """Where ``entry`` is cached. KEY is its checksum's prefix; with a checksum file (its
        digest unknown until fetched) or none, a digest of the source and checksum URLs."""
        sums = checksum_of(entry)
        if sums:
            key = sums.hexdigest[:16]
        else:
            origin = entry.source + ("\n" + entry.checksum_url if entry.checksum_url else "")
            key = hashlib.sha256(origin.encode()).hexdigest()[:16]
        return self.dir / f"{entry.name}-{key}.img"

    # -- fetching ---------------------------------------------------------------------

    def ensure(
        self, entry: ImageConfig, progress: Progress | None = None, *, job_id: str | None = None
    ) -> Path:
        """The cached path of ``entry``, fetching it first if needed (single flight).

        With ``job_id`` the image is marked in use by that job before it is looked up, so
        no eviction can remove it until :meth:`release`.
        """
        final = self.path_for(entry)
        self._check_file_url(entry)
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        marker = self.mark_used(final, job_id) if job_id is not None else None
        faults.point(self.cfg, "image.marked")
        try:
            held = _try_lock(_side(final, ".lock"), fcntl.LOCK_SH)
            if held is not None:
                with held:
                    if final.exists() and not self._due_for_refresh(entry, final):
                        _side(final, ".used").touch()
                        metrics.count(self.cfg, metrics.HITS)
                        return final
            metrics.count(self.cfg, metrics.MISSES)
            path = self._fetch_locked(entry, final, progress)
            _side(path, ".used").touch()
            return path
        except BaseException:
            if marker is not None:
                marker.unlink(missing_ok=True)
            raise

    def _fetch_locked(self, entry: ImageConfig, final: Path, progress: Progress | None) -> Path:
        part = final.with_name(f".{final.name}.part")
        lock = self._acquire(final, part, entry)
        if lock is None:
            # The holder stalled: fetch beside it, into our own partial file.
            own = final.with_name(f".{final.name}.part.{os.getpid()}")
            try:
                self._fetch(entry, final, own, progress)
                return final
            finally:
                own.unlink(missing_ok=True)
        with lock:
            if final.exists():
                if self._due_for_refresh(entry, final):
                    self._refresh(entry, final, part)
                return final  # in place: fetched by another process while we waited
            try:
                self._fetch(entry, final, part, progress)
            except BaseException:
                self._tidy(final, part)
                raise
        self.prune(keep=final)
        return final

    def _tidy(self, final: Path, part: Path) -> None:
        """After a failed fetch, under the exclusive lock: drop sidecars that serve nothing
        (a partial file stays, for the next try to resume)."""
        if final.exists() or part.exists():
            return
        with contextlib.suppress(OSError):
            _side(final, ".jobs").rmdir()  # only if empty
        _side(final, ".lock").unlink(missing_ok=True)

    def _acquire(self, final: Path, part: Path, entry: ImageConfig) -> IO[str] | None:
        """Take the fetch lock; None if its holder made no progress for stall_timeout."""
        last_size, last_change = -1, time.monotonic()
        while True:
            lock = _try_lock(_side(final, ".lock"), fcntl.LOCK_EX)
            if lock is not None:
                return lock
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
                return None
            time.sleep(_POLL)

    def _fetch(
        self,
        entry: ImageConfig,
        final: Path,
        part: Path,
        progress: Progress | None,
        validators: Validators | None = None,
        listed: Checksum | None = None,
    ) -> FetchResult:
        """Fetch ``entry`` into ``final``, verified by its catalog checksum or by the one its
        checksum file lists (``listed``, if already read; else read here first)."""
        if entry.checksum_url and listed is None:
            listed = self._listed_checksum(entry, entry.checksum_url, final)
        log.info("image %s: fetching %s", entry.name, entry.source)
        result = fetch(
            entry.name,
            entry.source,
            final,
            checksum=checksum_of(entry) or listed,
            connect_timeout=self.cfg.cache.connect_timeout,
            read_timeout=self.cfg.cache.read_timeout,
            progress=progress,
            part=part,
            validators=validators,
            room=lambda need: self.make_room(entry.name, need, keep=final),
            before_rename=lambda result: self._write_meta(entry, final, result, listed),
            debug=self.cfg.debug,
        )
        metrics.count(self.cfg, metrics.DOWNLOAD, result.transferred)
        return result

    def _listed_checksum(self, entry: ImageConfig, url: str, final: Path) -> Checksum:
        """Fetch ``entry``'s checksum file ``url`` (the download code's retries and
        timeouts) and find the digest it lists for the source's file name."""
        own = final.with_name(f".{final.name}.sums.{os.getpid()}")

        def limit(size: int, _total: int | None = None) -> None:
            if size > MAX_CHECKSUM_FILE:
                raise ImageSourceError(
                    f"image {entry.name!r}: the checksum file {url} is larger than"
                    f" {MAX_CHECKSUM_FILE // 2**20} MiB: not a checksum file",
                    hint=f"point [images.{entry.name}].checksum_url at the SHA256SUMS,"
                    " SHA512SUMS or CHECKSUM file beside the image",
                )

        log.info("image %s: reading checksum file %s", entry.name, url)
        try:
            fetch(
                entry.name,
                url,
                own,
                checksum=None,
                connect_timeout=self.cfg.cache.connect_timeout,
                read_timeout=self.cfg.cache.read_timeout,
                progress=limit,
                part=own.with_name(own.name + ".part"),
                room=limit,
                debug=self.cfg.debug,
                key="checksum_url",
            )
            text = own.read_text(encoding="utf-8", errors="replace")
        finally:
            own.unlink(missing_ok=True)
            own.with_name(own.name + ".part").unlink(missing_ok=True)
        return checksums.find(text, checksums.file_name(entry.source), image=entry.name, url=url)

    def _check_file_url(self, entry: ImageConfig) -> None:
        """``file://`` sources and checksum files only from below ``[cache].image_dirs``."""
        for key, url in (("source", entry.source), ("checksum_url", entry.checksum_url)):
            if url is None or not url.startswith("file://"):
                continue
            real = Path(os.path.realpath(url[len("file://") :]))
            roots = self.cfg.cache.image_dirs
            if not any(real.is_relative_to(os.path.realpath(r)) for r in roots):
                raise ImageError(
                    f"image {entry.name!r}: {key} {url} is outside the image directories"
                    f" ({', '.join(str(r) for r in roots)})",
                    hint="move the file there or add its directory to [cache].image_dirs",
                )

    # -- metadata and conditional refresh ----------------------------------------------

    def meta(self, path: Path) -> dict[str, Any] | None:
        """What was recorded when ``path`` was fetched (None if nothing readable)."""
        try:
            data = json.loads(_side(path, ".meta").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write_meta(
        self,
        entry: ImageConfig,
        final: Path,
        result: FetchResult,
        listed: Checksum | None = None,
    ) -> None:
        meta = _side(final, ".meta")
        data: dict[str, Any] = {
            "source": entry.source,
            "sha256": result.sha256,
            "size": result.size,
            "etag": result.validators.etag,
            "last_modified": result.validators.last_modified,
            "fetched_at": time.time(),
        }
        if listed is not None:  # what the checksum file said: a refresh compares with it
            data["checksum_url"] = entry.checksum_url
            data["listed"] = {"algorithm": listed.algorithm, "hexdigest": listed.hexdigest}
        tmp = meta.with_name(f".{meta.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.chmod(0o644)
        tmp.replace(meta)

    def _due_for_refresh(self, entry: ImageConfig, final: Path) -> bool:
        if entry.refresh_interval <= 0:
            return False
        fetched = (self.meta(final) or {}).get("fetched_at")
        return not isinstance(fetched, int | float) or (
            time.time() - fetched > entry.refresh_interval
        )

    def _refresh(self, entry: ImageConfig, final: Path, part: Path) -> None:
        """Revalidate a cached image (read its checksum file again, or ask the server
        whether an unverified one changed); keep the cached copy if that fails."""
        meta = self.meta(final) or {}
        if entry.checksum_url:
            self._refresh_listed(entry, entry.checksum_url, final, part, meta)
            return
        validators = Validators(meta.get("etag"), meta.get("last_modified"))
        try:
            result = self._fetch(entry, final, part, None, validators=validators)
        except VmBatchError as exc:
            log.warning("image %s: refresh failed (%s); using the cached copy", entry.name, exc)
            return
        if result.not_modified:
            log.info("image %s: not modified on the server; cached copy kept", entry.name)
            self._write_meta(
                entry, final, FetchResult(meta.get("sha256"), meta.get("size", 0), validators)
            )
        else:
            log.info("image %s: the server has a new version; cached copy replaced", entry.name)

    def _refresh_listed(
        self, entry: ImageConfig, url: str, final: Path, part: Path, meta: dict[str, Any]
    ) -> None:
        """Read the checksum file again: the same digest keeps the cached copy, another one
        fetches the image it now describes (a "latest" file that moved on)."""
        try:
            listed = self._listed_checksum(entry, url, final)
            known = meta.get("listed") or {}
            if (known.get("algorithm"), known.get("hexdigest")) == (
                listed.algorithm,
                listed.hexdigest,
            ):
                log.info("image %s: checksum file unchanged; cached copy kept", entry.name)
                result = FetchResult(
                    meta.get("sha256"),
                    meta.get("size", 0),
                    Validators(meta.get("etag"), meta.get("last_modified")),
                )
                self._write_meta(entry, final, result, listed)
                return
            self._fetch(entry, final, part, None, listed=listed)
        except VmBatchError as exc:
            log.warning("image %s: refresh failed (%s); using the cached copy", entry.name, exc)
            return
        log.info("image %s: the checksum file lists a new version; fetched it", entry.name)

    # -- use tracking and eviction ----------------------------------------------------

    def mark_used(self, path: Path, job_id: str) -> Path:
        """Record that ``job_id`` uses ``path``: its marker holds this boot's id and the
        identity of the process writing it (the reaper keeps a marker while it lives)."""
        jobs = _side(path, ".jobs")
        marker = jobs / safe_job_id(job_id)
        writer = state.process_identity(os.getpid()) or ""
        while True:
            jobs.mkdir(mode=0o755, exist_ok=True)
            try:
                marker.write_text(f"{state.boot_id()}\n{writer}\n")
                return marker
            except FileNotFoundError:
                continue  # a remover took the empty directory away just now

    def release(self, path: Path, job_id: str) -> None:
        """The job no longer uses ``path``; idempotent."""
        (_side(path, ".jobs") / safe_job_id(job_id)).unlink(missing_ok=True)

    def release_job(self, job_id: str) -> None:
        """The job uses no cached image any more (whatever it had marked); idempotent.

        Also the marker of an image that never arrived: a job killed while the image was
        looked up or fetched marked it first (SIGKILL skips :meth:`ensure`'s own clean-up),
        and a marker of this boot would keep the image from eviction once another job
        fetched it. Such a ``.jobs`` directory goes when it is empty (:meth:`mark_used`
        recreates it if another job is marking it right now).
        """
        if not self.dir.is_dir():
            return
        for jobs in self.dir.glob("*.img.jobs"):
            (jobs / safe_job_id(job_id)).unlink(missing_ok=True)
            if not jobs.with_suffix("").exists():
                with contextlib.suppress(OSError):
                    jobs.rmdir()  # only if empty

    def _jobs(self, path: Path) -> tuple[str, ...]:
        """Jobs of this boot using ``path``; markers from before a reboot are removed."""
        jobs = _side(path, ".jobs")
        if not jobs.is_dir():
            return ()
        boot = state.boot_id()
        live = []
        for marker in jobs.iterdir():
            try:
                owner = marker.read_text().partition("\n")[0].strip()
            except OSError:
                continue
            if owner and owner != boot:
                log.info(
                    "image %s: dropping marker of job %s from an earlier boot",
                    path.name,
                    marker.name,
                )
                marker.unlink(missing_ok=True)
            else:
                live.append(marker.name)  # empty: being written right now, counts as live
        return tuple(sorted(live))

    def markers(self) -> list[Marker]:
        """Every in-use marker of this boot (of cached images and of images gone since)."""
        if not self.dir.is_dir():
            return []
        boot = state.boot_id()
        found = []
        for jobs in sorted(self.dir.glob("*.img.jobs")):
            image = jobs.with_name(jobs.name[: -len(".jobs")])
            try:
                names = sorted(p.name for p in jobs.iterdir())
            except OSError:
                continue
            for name in names:
                path = jobs / name
                try:
                    text = path.read_text()
                    mtime = path.stat().st_mtime
                except OSError:
                    continue  # released meanwhile
                first, _, rest = text.partition("\n")
                if first.strip() and first.strip() != boot:
                    continue  # an earlier boot's: _jobs drops it
                found.append(Marker(path, image, name, rest.strip() or None, mtime))
        return found

    def sweep(self, *, older_than: float, now: float, dry_run: bool = False) -> list[Swept]:
        """Remove what fetchers that died left in the cache (see the module docstring).

        A partial file counts as abandoned only when its image's lock is free (no process
        fetches it) and it has not changed since ``now - older_than``. With ``dry_run``
        nothing is removed; the result says what would be.
        """
        if not self.dir.is_dir():
            return []
        names = sorted(p.name for p in self.dir.iterdir())
        swept: list[Swept] = []
        fetching: set[str] = set()  # images a stall-takeover fetcher is fetching right now
        for name in names:
            m = _OWN_FILE.fullmatch(name)
            if m is None:
                continue
            if _pid_alive(int(m["pid"])):
                fetching.add(m["image"])
                continue
            what = {"meta": "metadata temp file", "sums": "checksum file"}.get(
                m["kind"], "partial download"
            )
            item = Swept(self.dir / name, what, f"process {m['pid']} that wrote it is gone")
            if not dry_run:
                item.path.unlink(missing_ok=True)
            swept.append(item)
        for image in sorted({i for n in names if (i := _image_of(n)) is not None}):
            swept += self._sweep_image(
                self.dir / image, names, image in fetching, older_than, now, dry_run
            )
        return swept

    def _sweep_image(
        self,
        final: Path,
        names: list[str],
        fetching: bool,
        older_than: float,
        now: float,
        dry_run: bool,
    ) -> list[Swept]:
        """:meth:`sweep` for one image, under its exclusive lock (skipped while held)."""
        parts = [final.with_name(f".{final.name}{s}") for s in (".part", ".part.unpacked")]
        cached = final.name in names
        if cached and not any(p.name in names for p in parts):
            return []  # nothing of a fetch to look at: do not even take the lock
        lock_path = _side(final, ".lock")
        had_lock = lock_path.name in names
        held: contextlib.AbstractContextManager[object]
        if dry_run and not had_lock:
            held = contextlib.nullcontext()  # nobody can hold a lock file that is not there
        else:
            lock = _try_lock(lock_path, fcntl.LOCK_EX)  # (creates a missing lock file)
            if lock is None:
                return []  # being fetched, looked up or removed right now: leave it alone
            held = lock
        swept: list[Swept] = []
        with held:
            kept = False
            for part in parts:
                try:
                    idle = now - part.stat().st_mtime
                except FileNotFoundError:
                    continue
                if idle < older_than:
                    kept = True  # kept for the next fetch to resume
                    continue
                why = f"no process fetches it; unchanged for {idle / 60:.0f} min"
                swept.append(Swept(part, "partial download", why))
            final_gone = not cached and not final.exists()
            if final_gone and not kept and not fetching:
                gone = "its image is not in the cache"
                for suffix in (".used", ".meta"):
                    if _side(final, suffix).exists():
                        swept.append(Swept(_side(final, suffix), f"{suffix} file", gone))
                jobs = _side(final, ".jobs")
                with contextlib.suppress(OSError):
                    if jobs.is_dir() and not any(jobs.iterdir()):
                        swept.append(Swept(jobs, "empty .jobs directory", gone))
                if had_lock:
                    swept.append(Swept(lock_path, "lock file", f"{gone}; nobody holds it"))
            if not dry_run:
                for item in swept:
                    with contextlib.suppress(OSError):
                        if item.path.is_dir():
                            item.path.rmdir()  # only if still empty
                        else:
                            item.path.unlink(missing_ok=True)
                if final_gone and not kept and not fetching:
                    lock_path.unlink(missing_ok=True)  # while held: see _try_lock
        return swept

    def entries(self) -> list[CacheEntry]:
        if not self.dir.is_dir():
            return []
        result = []
        for p in sorted(self.dir.glob("*.img")):
            stamp = _side(p, ".used")
            try:
                size = p.stat().st_size
                used = stamp.stat().st_mtime if stamp.exists() else None
            except FileNotFoundError:
                continue  # removed meanwhile
            result.append(CacheEntry(p, size, used, self._jobs(p)))
        return result

    def remove(self, path: Path, *, force: bool = False) -> bool:
        """Delete one cached image unless a job uses it; True if it was removed.

        ``force`` removes it even while jobs use it (a corrupt copy); their VMs keep the
        open file, and their markers stay so the refetched copy counts as in use.
        """
        lock_path = _side(path, ".lock")
        lock = _try_lock(lock_path, fcntl.LOCK_EX)
        if lock is None:
            return False  # being fetched or looked up right now: leave it alone
        with lock:
            if not force and self._jobs(path):
                return False
            path.unlink(missing_ok=True)
            _side(path, ".used").unlink(missing_ok=True)
            _side(path, ".meta").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                _side(path, ".jobs").rmdir()
            lock_path.unlink(missing_ok=True)
        return True

    def make_room(self, name: str, need: int, *, keep: Path | None = None) -> None:
        """Evict LRU images not in use until ``need`` more bytes fit under the cap and above
        ``[disks].reserve_gib`` of free space; raise DiskSpaceError if they cannot."""
        reserve = int(self.cfg.disks.reserve_gib * 2**30)
        cap = int(self.cfg.cache.max_size_gib * 2**30)
        others = [e for e in self.entries() if e.path != keep]
        total = sum(e.size for e in others)
        for e in sorted(others, key=lambda e: e.last_used or 0.0):
            over_cap = cap > 0 and total + need > cap
            if not over_cap and free_bytes(self.dir) - need >= reserve:
                break
            if not e.jobs and self.remove(e.path):
                log.info("image %s: evicted %s (%s) to make room", name, e.path.name, _gib(e.size))
                total -= e.size
        free = free_bytes(self.dir)
        if free - need < reserve:
            raise DiskSpaceError(
                f"image {name!r}: needs {_gib(need)} in {self.dir}, which has {_gib(free)} free"
                f" and must keep {_gib(reserve)} ([disks].reserve_gib); the other cached"
                " images are in use",
                hint="free space on that file system or move [paths].cache_dir",
            )
        if cap > 0 and total + need > cap:
            log.warning(
                "image %s: the cache will exceed [cache].max_size_gib (%s) because the"
                " other images are in use",
                name,
                _gib(cap),
            )

    def prune(self, *, keep: Path | None = None) -> list[Path]:
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
            if e.path != keep and not e.jobs and self.remove(e.path):
                total -= e.size
                removed.append(e.path)
        return removed

    def verify(self, entry: ImageConfig) -> bool | None:
        """Re-hash the cached copy; a mismatch deletes it (the next use fetches it again).

        The catalog checksum is used where it describes the stored file; for unpacked
        copies of compressed sources and for unverified images, the SHA-256 recorded when
        the file was stored. None if it is not cached or nothing is known to compare with.
        """
        path = self.path_for(entry)
        if not path.exists():
            return None
        sums = checksum_of(entry)
        if sums is None or compression(entry.source) is not None:
            recorded = (self.meta(path) or {}).get("sha256")
            sums = Checksum("sha256", recorded) if isinstance(recorded, str) else None
        if sums is None:
            return None
        if file_digest(path, sums.algorithm) == sums.hexdigest:
            return True
        log.error("image %s: cached copy %s is corrupt; removing it", entry.name, path)
        self.remove(path, force=True)
        return False
