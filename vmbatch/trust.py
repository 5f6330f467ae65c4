"""What root may rely on: paths that only root can change.

vmbatch's root code (prologue, privileged job starter, epilogue, ``vmbatch cleanup``) reads
its configuration and writes job state on a node shared with every user of the cluster. A
file is trustworthy only if no one but root could have written it or swapped it: the file
and every directory above it must be owned by root and not writable by group or others. A
directory writable by others is accepted above the file only with the sticky bit (``/tmp``):
there no one else can rename or remove root's entries (``unlink(2)``, EPERM; ``inode(7)``,
"S_ISVTX"). Symbolic links are followed and the target checked the same way, and the link
itself must lie in such a directory. This is OpenSSH's ``StrictModes`` check of
``authorized_keys`` (sshd_config(5)) and sudo's of ``sudoers``, applied to every component.

A path that does not exist yet is judged by its nearest existing ancestor: root creates the
rest itself.

Disk images are the one exception to "owned by root": libvirt hands a disk and its backing
chain to QEMU's user while a VM uses it (``dynamic_ownership``, qemu.conf(5)), so a shared
base image is often owned by ``libvirt-qemu`` (Debian) or ``qemu`` (EL). Such files may
also belong to that account (:func:`qemu_uids`); their directories may not.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

#: Directories deeper than this are refused rather than walked (a symlink loop).
_MAX_LINKS = 40


def qemu_uids() -> frozenset[int]:
    """The accounts libvirt runs QEMU as (Debian ``libvirt-qemu``, EL ``qemu``), if any."""
    uids = set()
    for name in ("libvirt-qemu", "qemu"):
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    return frozenset(uids)


def untrusted_reason(path: Path, owners: frozenset[int] = frozenset({0})) -> str | None:
    """Why ``path`` is not under root's sole control, or None if it is.

    ``owners``: who may own the file itself (directories above it: root only).
    """
    if not path.is_absolute():
        return f"{path} is not an absolute path"
    return _walk(Path(os.path.normpath(path)), 0, owners)


def _walk(path: Path, links: int, owners: frozenset[int]) -> str | None:
    parts = path.parts
    current = Path(parts[0])
    for i, name in enumerate(parts[1:], start=1):
        parent = current
        current = parent / name
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None  # root makes the rest below an ancestor already checked
        except OSError as exc:
            return f"{current}: {exc.strerror}"
        if stat.S_ISLNK(st.st_mode):
            if links >= _MAX_LINKS:
                return f"{current}: too many symbolic links"
            # The link's own directory (``parent``) passed already; follow it.
            target = Path(os.path.normpath(parent / current.readlink()))
            rest = Path(*parts[i + 1 :]) if i + 1 < len(parts) else None
            return _walk(target / rest if rest else target, links + 1, owners)
        last = i == len(parts) - 1
        problem = _judge(current, st, last, owners if last else frozenset({0}))
        if problem is not None:
            return problem
    if len(parts) == 1:  # "/" itself
        return _judge(current, os.lstat(current), True, frozenset({0}))
    return None


def _judge(path: Path, st: os.stat_result, last: bool, owners: frozenset[int]) -> str | None:
    if st.st_uid not in owners:
        return f"{path} is owned by uid {st.st_uid}, not root"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if not writable:
        return None
    if stat.S_ISDIR(st.st_mode) and not last and st.st_mode & stat.S_ISVTX:
        return None  # /tmp: others cannot rename or remove root's entries
    return f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"


def fix_hint(path: Path) -> str:
    return (
        f"make {path} and every directory above it owned by root and not writable by group"
        f" or others (chown root: ...; chmod go-w ...)"
    )
