"""The image catalog: names a job may ask for, resolved to inspected base images.

Only catalog images are allowed for jobs. ``vmbatch run`` additionally accepts a path to a
local image when run by root by hand (for testing images before adding them).

Every base image is inspected with ``qemu-img info --output=json`` before use
(https://www.qemu.org/docs/master/tools/qemu-img.html): its format must be qcow2 or raw and
agree with the catalog, it must name no other host file (a hostile qcow2 could otherwise
make QEMU read it and show it to the guest): no backing file (``backing-filename``) and no
external data file (qcow2's ``data_file`` option, e.g. ``-o data_file=/etc/shadow,
data_file_raw=on``: the guest's disk *is* that file; ``qemu-img info`` reports it as
``format-specific.data.data-file`` and ``data-file-raw``, QAPI ``ImageInfoSpecificQCow2``,
https://www.qemu.org/docs/master/interop/qemu-qmp-ref.html). A "raw" file must at least look
like a disk (non-empty, whole 512-byte sectors). Anything else is refused with the reason.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from vmbatch import process, trust
from vmbatch.config import Config, ContextName, ImageConfig
from vmbatch.errors import CommandError, ImageError, UnknownImageError
from vmbatch.images.cache import ImageCache, is_cached_source
from vmbatch.images.download import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """A base image ready to be used for a job's VM."""

    name: str
    path: Path
    format: Literal["qcow2", "raw"]
    virtual_size: int
    memory: int
    vcpus: int
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    firmware: Path | None = None
    #: Sizes of the per-job empty disks in GiB (0: none).
    cvmfs_cache_gib: float = 0.0
    scratch_gib: float = 0.0
    #: True if ``path`` lies in the node cache (then it is marked in use per job).
    cached: bool = False
    #: The contextualization method (a key of ``vmbatch.contextualize.REGISTRY``).
    context: ContextName = "nocloud"


def check_trusted(entry: ImageConfig) -> None:
    """Refuse an image whose local files someone other than root could swap.

    A user who could replace a base image, kernel, initrd or firmware would run their code
    in other users' VMs. They may belong to QEMU's account, to which libvirt lends them
    while VMs run (``dynamic_ownership``); their directories must be root's
    (:mod:`vmbatch.trust`). An ImageError fails the jobs of this image only.
    """
    source = entry.source.removeprefix("file://")
    files = [Path(source)] if source.startswith("/") else []
    files += [p for p in (entry.kernel, entry.initrd, entry.firmware) if p is not None]
    owners = frozenset({0}) | trust.qemu_uids()
    for path in files:
        reason = trust.untrusted_reason(path, owners)
        if reason is not None:
            raise ImageError(
                f"image {entry.name!r}: {reason}; vmbatch will not boot it",
                hint=trust.fix_hint(path),
            )


def resolve(
    cfg: Config,
    image: str,
    *,
    allow_path: bool = False,
    progress: Progress | None = None,
    job_id: str | None = None,
) -> ImageSpec:
    """Resolve a catalog name (or, with ``allow_path``, a local file) to an ImageSpec.

    Remote and ``file://`` sources are fetched into the cache first (single flight). A
    cached copy that ``qemu-img`` cannot read is removed and fetched once more. With
    ``job_id`` a cached image is marked in use by the job (see ``ImageCache.release``).
    """
    entry = cfg.images.get(image)
    if entry is None:
        if allow_path and "/" in image:
            entry = ImageConfig(name=Path(image).name, source=str(Path(image).absolute()))
        else:
            known = ", ".join(sorted(cfg.images)) or "none configured"
            if "/" in image:
                hint = f"jobs may only use catalog images ({known}); add the file as an image"
            else:
                hint = f"known images: {known}; add [images.{image}] to the configuration"
            raise UnknownImageError(f"unknown image {image!r}", hint=hint)
    for key in ("kernel", "initrd", "firmware"):
        p = cast(Path | None, getattr(entry, key))
        if p is not None and not os.access(p, os.R_OK):
            raise ImageError(
                f"image {entry.name!r}: {key} {p} is missing or unreadable",
                hint=f"fix [images.{entry.name}].{key} or rebuild the image",
            )
    if os.geteuid() == 0:
        check_trusted(entry)
    if is_cached_source(entry):
        cache = ImageCache(cfg)
        path = cache.ensure(entry, progress, job_id=job_id)
        try:
            try:
                fmt, size = inspect(cfg, entry, path)
            except ImageError as exc:
                log.warning(
                    "image %s: cached copy unusable (%s); fetching it again", entry.name, exc
                )
                cache.remove(path, force=True)
                path = cache.ensure(entry, progress, job_id=job_id)
                fmt, size = inspect(cfg, entry, path)
        except BaseException:
            if job_id is not None:
                cache.release(path, job_id)
            raise
    else:
        path = Path(entry.source)
        fmt, size = inspect(cfg, entry, path)
    return ImageSpec(
        name=entry.name,
        path=path,
        format=fmt,
        virtual_size=size,
        memory=entry.memory or cfg.vm.memory,
        vcpus=entry.vcpus or cfg.vm.vcpus,
        kernel=entry.kernel,
        initrd=entry.initrd,
        cmdline=entry.cmdline,
        firmware=entry.firmware,
        cvmfs_cache_gib=(
            cfg.disks.cvmfs_cache_gib if entry.cvmfs_cache_gib is None else entry.cvmfs_cache_gib
        ),
        scratch_gib=cfg.disks.scratch_gib if entry.scratch_gib is None else entry.scratch_gib,
        cached=is_cached_source(entry),
        context=entry.context,
    )


def inspect(cfg: Config, entry: ImageConfig, path: Path) -> tuple[Literal["qcow2", "raw"], int]:
    """Check the image file with ``qemu-img info``; return (format, virtual size)."""
    where = f"image {entry.name!r} ({path})"
    if not path.is_file():
        raise ImageError(
            f"{where}: file not found",
            hint=f"fix [images.{entry.name}].source or build/copy the image there",
        )
    if not os.access(path, os.R_OK):
        raise ImageError(f"{where}: not readable", hint="make it readable by root")
    argv = [str(cfg.tools.qemu_img), "info", "--output=json"]
    if entry.format is not None:
        argv += ["-f", entry.format]
    argv.append(str(path))
    try:
        res = process.run(argv, timeout=cfg.tools.command_timeout)
        info = json.loads(res.stdout)
    except CommandError as exc:
        raise ImageError(f"{where}: not a usable disk image: {exc.message}") from exc
    except ValueError as exc:
        raise ImageError(f"{where}: qemu-img info gave unreadable output") from exc
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise ImageError(
            f"{where}: format {fmt!r} is not supported",
            hint="convert it with `qemu-img convert -O qcow2`",
        )
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError(
            f"{where}: has a backing file ({info.get('backing-filename')}); refused for safety",
            hint="flatten it with `qemu-img convert -O qcow2 IN OUT`",
        )
    data_file = _external_data_file(info)
    if data_file is not None:
        raise ImageError(
            f"{where}: has an external data file ({data_file}); refused for safety",
            hint="make it self-contained with `qemu-img convert -O qcow2 IN OUT`",
        )
    size = int(info.get("virtual-size", 0))
    # qemu-img rounds a raw file's size up to whole sectors; a real disk has whole sectors.
    length = path.stat().st_size
    if fmt == "raw" and (length == 0 or length % 512 != 0):
        raise ImageError(
            f"{where}: does not look like a disk image "
            f"(raw, {length} bytes, not whole 512-byte sectors)",
            hint="point the catalog at a qcow2 or raw disk image",
        )
    limit = cfg.cache.max_virtual_size_gib * 2**30
    if size > limit:
        raise ImageError(
            f"{where}: virtual size {size / 2**30:.1f} GiB exceeds the limit of"
            f" {cfg.cache.max_virtual_size_gib:g} GiB",
            hint="raise [cache].max_virtual_size_gib if this image is trusted",
        )
    return cast(Literal["qcow2", "raw"], fmt), size


def _external_data_file(info: dict[str, Any]) -> str | None:
    """The qcow2 external data file ``qemu-img info`` reports, or None if there is none.

    ``data-file`` is the name stored in the image; ``data-file-raw`` is reported whenever
    QEMU treats the image as having a data file (``qcow2_get_specific_info``:
    ``has_data_file_raw = has_data_file(bs)``), even one whose name is not stored in it.
    """
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if not isinstance(data, dict) or not ("data-file" in data or "data-file-raw" in data):
        return None
    return str(data.get("data-file") or "name not stored in the image")
