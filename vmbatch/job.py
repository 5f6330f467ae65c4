"""JobSpec: what one job asks for (built by ``vmbatch run`` and by vmbatch.hooks.batch).

:class:`JobUser` is the identity the job runs as inside the guest. Every field ends up in
contextualization files (YAML, ini, shell, passwd lines), so it is validated here, once, and
strictly: a name that does not match :data:`USER_NAME` or a uid/gid of 0 is refused with
a :class:`~vmbatch.errors.JobError` that says why, never escaped and passed on.
"""

from __future__ import annotations

import getpass
import grp
import logging
import os
import pwd
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from vmbatch.errors import JobError

log = logging.getLogger(__name__)

#: User and group names: the portable set (POSIX 3.437) with a leading letter or '_',
#: at most 32 characters (useradd's limit); no '$' (Samba machine accounts), no spaces.
USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}")
#: Absolute home path from a conservative character set: it is written into passwd lines
#: and shell commands.
HOME_PATH = re.compile(r"/[A-Za-z0-9._+@-]+(/[A-Za-z0-9._+@-]+)*")
_MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"


def _check_id(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError(f"job {what} {value!r} is not a number")
    if value == 0:
        raise JobError(
            f"job {what} 0 (root) refused: jobs never run as root inside the VM",
            hint="submit the job as an ordinary user",
        )
    if not 0 < value <= _MAX_ID:
        raise JobError(f"job {what} {value} is out of range (1-{_MAX_ID})")


def _check_name(what: str, value: str) -> None:
    if not USER_NAME.fullmatch(value):
        raise JobError(
            f"job {what} {value!r} is not a valid name",
            hint="names must start with a letter or '_' and use only letters, digits,"
            " '.', '_' and '-' (at most 32)",
        )
    if value == "root":
        raise JobError(f"job {what} 'root' refused: jobs never run as root inside the VM")


@dataclass(frozen=True, slots=True)
class JobUser:
    """Who the job runs as inside the guest: the same name, uid and gid as on the node.

    ``groups`` are supplementary groups as (name, gid).
    """

    name: str
    uid: int
    gid: int
    group: str
    home: str
    groups: tuple[tuple[str, int], ...] = ()
    shell: str = "/bin/bash"

    def __post_init__(self) -> None:
        _check_name("user", self.name)
        _check_id("uid", self.uid)
        _check_id("gid", self.gid)
        _check_name("group", self.group)
        for name, gid in self.groups:
            _check_name("group", name)
            _check_id("gid", gid)
        for what, path in (("home", self.home), ("shell", self.shell)):
            if not HOME_PATH.fullmatch(path) or "/../" in path + "/" or "/./" in path + "/":
                raise JobError(
                    f"job {what} {path!r} is not a plain absolute path",
                    hint="use letters, digits and . _ + @ - between slashes",
                )

    @classmethod
    def from_host(cls, name: str) -> JobUser:
        """The identity of ``name`` in the node's user and group databases.

        The groups are those the node gives ``name`` at login: ``os.getgrouplist``
        (getgrouplist(3): every NSS source of the node, /etc/group, LDAP, sssd, ...), each
        named by ``grp.getgrgid``; read here, in the prologue, never from the job. A
        supplementary group whose name cannot go into the guest (no name, gid 0, or not a
        portable name, see :data:`USER_NAME`: spaces, shell metacharacters, over 32
        characters) is left out with a warning; a primary group without a usable name keeps
        its gid under the name ``vmbatch-gGID``. Which groups the guest gives is decided by
        :mod:`vmbatch.contextualize.groups` (privileged groups are never given).
        """
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise JobError(f"user {name!r} does not exist on this node") from None
        primary = _group_name(pw.pw_gid)
        why = _unusable(primary, pw.pw_gid)
        if why is not None:
            fallback = f"vmbatch-g{pw.pw_gid}"
            log.warning("user %s: primary group %r: %s; in the guest it is %s", name, primary,
                        why, fallback)  # fmt: skip
            primary = fallback
        groups: list[tuple[str, int]] = []
        for gid in dict.fromkeys(os.getgrouplist(name, pw.pw_gid)):
            if gid == pw.pw_gid:
                continue
            group = _group_name(gid)
            why = _unusable(group, gid)
            if why is not None:
                log.warning("user %s: group %r (gid %d) is not given in the guest: %s", name,
                            group, gid, why)  # fmt: skip
                continue
            groups.append((str(group), gid))
        return cls(name, pw.pw_uid, pw.pw_gid, str(primary), pw.pw_dir, tuple(groups))


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _unusable(name: str | None, gid: int) -> str | None:
    """Why the node's group cannot go into the guest's files and commands as it is."""
    if name is None:
        return f"gid {gid} has no name on this node"
    if gid == 0 or name == "root":
        return "the root group is never given in the guest"
    if not 0 < gid <= _MAX_ID:
        return f"gid {gid} is out of range"
    if not USER_NAME.fullmatch(name):
        return (
            "not a portable group name (letters, digits, '.', '_', '-', at most 32, starting"
            " with a letter or '_')"
        )
    return None


@dataclass(frozen=True, slots=True)
class JobSpec:
    """An immutable description of one job's request."""

    job_id: str
    user: str
    image: str
    argv: tuple[str, ...]
    scheduler: str = "none"
    memory: int | None = None
    vcpus: int | None = None
    #: ``vmbatch run`` by root may name a local image file instead of a catalog entry.
    allow_image_path: bool = False
    #: Who the job runs as in the guest; None only for root's ``vmbatch run`` without
    #: ``--user``, which logs in as ``[ssh].user`` (a debugging aid).
    identity: JobUser | None = None
    #: The job's script (None: ``argv`` is run exactly, see guest.session.command_script).
    script: bytes | None = None
    #: The job's environment as the scheduler gave it (filtered by guest.session).
    environment: Mapping[str, str] = field(default_factory=dict)
    #: Working directory in the guest (None: the user's home).
    workdir: str | None = None
    #: Wall-clock limit in seconds enforced inside the guest (0: none).
    walltime: int = 0
    #: Host CPUs (OS numbering) the VM's threads are pinned to; empty: not pinned.
    cpus: frozenset[int] = frozenset()
    #: Hard limit in MiB on the VM's QEMU (guest RAM plus QEMU's overhead); None: the
    #: guest's ``memory`` plus the overhead formula, if ``[limits].memory_limit``.
    memory_limit: int | None = None


def interactive(
    image: str,
    argv: tuple[str, ...],
    *,
    memory: int | None = None,
    vcpus: int | None = None,
    allow_image_path: bool = False,
    identity: JobUser | None = None,
    environment: Mapping[str, str] | None = None,
    workdir: str | None = None,
    walltime: int = 0,
) -> JobSpec:
    """A JobSpec for ``vmbatch run`` from a shell: a fresh id, the calling user."""
    return JobSpec(
        job_id=f"run-{uuid.uuid4().hex[:12]}",
        user=identity.name if identity else getpass.getuser(),
        image=image,
        argv=argv,
        memory=memory,
        vcpus=vcpus,
        allow_image_path=allow_image_path,
        identity=identity,
        environment=dict(environment or {}),
        workdir=workdir,
        walltime=walltime,
    )
