"""Shared filesystems (``[mounts.NAME]``) mounted in the guest before the job starts.

vmbatch logs in as root with the per-job admin key (installed by every contextualization
method only when mounts are configured) and mounts each filesystem at the same path as on
the node, parents before children, one ``mount`` attempt at a time:

- ``mount -t nfs -o retry=0,...``: ``mount.nfs`` would otherwise retry for two minutes by
  itself (nfs(5), ``retry=n``; docs/platform.md); with ``retry=0`` it makes one attempt and
  vmbatch decides the retries under :data:`~vmbatch.retry.NFS_MOUNT_POLICY`, bounded by the
  mount's ``timeout``. Each attempt runs under the guest's ``timeout -s KILL``, because a
  server that accepts the connection but never answers (stopped, overloaded) would hold
  ``mount`` for minutes; NFS waits are killable (TASK_KILLABLE).
- The server's name is resolved on the node, with the node's resolver, as the node's own
  mounts are; the guest gets the address. A server on the node's loopback is reached at the
  user-mode network's gateway 10.0.2.2, which QEMU connects to the host's 127.0.0.1
  (https://wiki.qemu.org/Documentation/Networking, "User Networking"). NFSv4 needs only
  the server's one port (RFC 7530 section 3.1), which is why it is the supported protocol.
- A mount that still fails when its budget is spent raises :class:`MountError` (requeue: a
  server or network problem of this node, not the job's) naming the server, export and
  the last error ``mount`` printed. A guest without ``mount.nfs`` is the image's problem
  (:class:`ImageError`, the job is aborted: install nfs-common in the image).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import shlex
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

import paramiko

from vmbatch.config import NFS_URL, MountConfig
from vmbatch.errors import ImageError, MountError
from vmbatch.guest import ssh
from vmbatch.retry import NFS_MOUNT_POLICY

log = logging.getLogger(__name__)

#: The host's 127.0.0.1 as seen from a guest on QEMU's user-mode network.
USER_NET_GATEWAY = "10.0.2.2"
NFS_PORT = 2049
#: Exit status of the mount script when the guest has no ``mount.nfs``.
_NO_HELPER = 127


@dataclass(frozen=True, slots=True)
class NfsSource:
    """``nfs://host[:port]/export`` taken apart."""

    host: str
    port: int
    export: str

    @classmethod
    def parse(cls, url: str) -> NfsSource:
        m = NFS_URL.fullmatch(url)
        if m is None:  # config validation already refused it
            raise ValueError(f"not an nfs:// URL: {url!r}")
        return cls(m["host"], int(m["port"] or NFS_PORT), m["export"])

    def guest_address(self) -> str:
        """The server's IPv4 address as the guest must use it (resolved on the node)."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            raise MountError(
                f"NFS server {self.host!r} (export {self.export}): cannot resolve the name"
                f" on this node: {exc}",
                hint="check the node's resolver or use the server's address in [mounts]",
                transient=True,
            ) from exc
        address = str(infos[0][4][0])
        return USER_NET_GATEWAY if ipaddress.ip_address(address).is_loopback else address


def mount_options(mount: MountConfig, source: NfsSource) -> str:
    """``retry=0``, the port when it is not 2049, then the site's options."""
    opts = ["retry=0"]
    if source.port != NFS_PORT:
        opts.append(f"port={source.port}")
    opts += [o for o in mount.options.split(",") if o]
    return ",".join(opts)


def mount_script(mount: MountConfig, address: str, attempt_timeout: float) -> str:
    """The root shell script for one attempt: check the helper, make the mount point, mount.

    Every value is quoted with ``shlex.quote`` (and was validated by the config loader).
    """
    source = NfsSource.parse(mount.source)
    q = shlex.quote
    return "\n".join(
        [
            "command -v mount.nfs >/dev/null 2>&1 || "
            f"{{ echo 'mount.nfs not found' >&2; exit {_NO_HELPER}; }}",
            f"mkdir -p {q(str(mount.path))} || exit 1",
            f"timeout -s KILL {max(1, int(attempt_timeout))}"
            f" mount -t nfs -o {q(mount_options(mount, source))}"
            f" {q(address + ':' + source.export)} {q(str(mount.path))}",
        ]
    )


def mount_all(
    client: paramiko.SSHClient, mounts: Iterable[MountConfig], image: str
) -> dict[str, float]:
    """Mount every filesystem over ``client`` (logged in as root); return seconds per mount."""
    took: dict[str, float] = {}
    for mount in sorted(mounts, key=lambda m: len(m.path.parts)):
        start = time.monotonic()
        _mount_one(client, mount, image)
        took[mount.name] = time.monotonic() - start
        log.info("mounted %s at %s in %.1fs", mount.source, mount.path, took[mount.name])
    return took


def _mount_one(client: paramiko.SSHClient, mount: MountConfig, image: str) -> None:
    source = NfsSource.parse(mount.source)
    where = f"NFS server {source.host}:{source.port}, export {source.export}"
    deadline = time.monotonic() + mount.timeout
    attempts = 0
    last = ""
    try:
        for attempt in NFS_MOUNT_POLICY.retrying(max_delay=mount.timeout):
            with attempt:
                attempts += 1
                address = source.guest_address()
                budget = min(mount.attempt_timeout, max(1.0, deadline - time.monotonic()))
                out, err = io.BytesIO(), io.BytesIO()
                status = ssh.run(
                    client,
                    ("sh", "-c", mount_script(mount, address, budget)),
                    out,
                    err,
                    timeout=budget + 15,
                )
                last = (err.getvalue() + out.getvalue()).decode("utf-8", "replace").strip()
                if status == _NO_HELPER:
                    raise ImageError(
                        f"image {image!r} cannot mount {mount.source}: it has no mount.nfs",
                        hint="install nfs-common (Debian) or nfs-utils (EL) in the image",
                    )
                if status != 0:
                    if status == 137:
                        last = f"no answer within {budget:.0f}s (attempt_timeout)"
                    raise MountError(f"{where}: {last or f'mount exited {status}'}", transient=True)
    except MountError as exc:
        raise MountError(
            f"could not mount {where} at {mount.path} in the guest ({attempts} attempts in"
            f" {mount.timeout:.0f}s): {last or exc}",
            hint="check that the server is up and exports it to this node (knfsd: with the"
            " 'insecure' option, the guest's traffic leaves from an unprivileged port), or"
            f" raise [mounts.{mount.name}].timeout",
        ) from exc
