"""NoCloud seed: ISO9660 volume ``cidata`` with ``user-data`` and ``meta-data``.

Read by cloud-init's DataSourceNoCloud
(https://cloudinit.readthedocs.io/en/latest/reference/datasources/nocloud.html): a filesystem
labelled ``cidata`` holding ``meta-data`` (``instance-id``, ``local-hostname``) and
``user-data`` (``#cloud-config``). Keys used, per the cloud-config module docs
(https://cloudinit.readthedocs.io/en/latest/reference/modules.html):
``ssh_authorized_keys`` (default user; with ``disable_root: false`` root gets them too),
``ssh_keys`` with ``ed25519_private``/``ed25519_public`` (the host key sshd serves, pinned by
vmbatch), ``ssh_deletekeys``, ``ssh_genkeytypes: [ed25519]`` (the schema wants at least
one type; with ``ssh_keys`` given cloud-init generates none anyway),
``ssh_pwauth: false``.

The job's user (``users``, cloud-init's users-groups module, 22.4 as in Debian 12): name,
``uid``, ``primary_group`` and ``groups`` by *number*, ``homedir``, ``shell``,
``lock_passwd: true`` (no password login) and the per-job key in ``ssh_authorized_keys``;
no ``default`` entry, so the image's default user gets no key; ``create_groups: false``,
because cloud-init would otherwise create a group *named* "4242" for a numeric group.
The groups themselves are made with their exact gids by a ``bootcmd`` (which runs before
users-groups): for each, ``groupadd -g GID NAME`` unless a group with that gid exists,
falling back to the name ``vmbatch-gGID`` if NAME is taken by another gid. All values are
validated by :class:`~vmbatch.job.JobUser` and quoted with ``shlex.quote`` as well.
Root gets no key and ``disable_root: true``. A pre-existing account of the same name keeps
its uid (cloud-init skips existing users); vmbatch checks ``id`` after login and refuses.

Generated from Python data with a YAML dumper (multi-line strings as literal blocks), never
from text templates. The ISO is built in-process with pycdlib, with Rock Ridge and Joliet
names so every reader sees ``user-data``/``meta-data``. The tiny test guest's init parses the
same files, relying on this exact layout (see ``guests/tiny/init``).
"""

from __future__ import annotations

import io
import shlex
from typing import Any

import pycdlib
import yaml

from vmbatch.contextualize.base import ContextSpec
from vmbatch.libvirt.domain import DiskSpec
from vmbatch.state import JobDir

VOLUME_ID = "cidata"


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as ``|`` blocks (keys stay readable)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(data: dict[str, Any]) -> str:
    return yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=False,
        width=4096,
    )


def _group_command(name: str, gid: int) -> str:
    """Shell command making sure a group with ``gid`` exists (see the module doc)."""
    g, n, alt = shlex.quote(str(gid)), shlex.quote(name), shlex.quote(f"vmbatch-g{gid}")
    return f"getent group {g} >/dev/null || groupadd -g {g} {n} || groupadd -g {g} {alt}"


def user_data(spec: ContextSpec) -> str:
    """The ``#cloud-config`` document for ``spec``."""
    data: dict[str, Any] = {
        "hostname": spec.hostname,
        "disable_root": spec.user is not None,
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],
    }
    user = spec.user
    if user is None:
        data["ssh_authorized_keys"] = list(spec.authorized_keys)
    else:
        groups = [(user.group, user.gid), *user.groups]
        data["bootcmd"] = [_group_command(name, gid) for name, gid in groups]
        entry: dict[str, Any] = {
            "name": user.name,
            "uid": user.uid,
            "primary_group": str(user.gid),
            "create_groups": False,
            "homedir": user.home,
            "shell": user.shell,
            "lock_passwd": True,
            "ssh_authorized_keys": list(spec.authorized_keys),
        }
        if user.groups:
            entry["groups"] = ",".join(str(gid) for _, gid in user.groups)
        data["users"] = [entry]
    data["ssh_keys"] = {
        "ed25519_private": spec.host_key.private_openssh,
        "ed25519_public": spec.host_key.public_openssh,
    }
    return "#cloud-config\n" + _dump(data)


def meta_data(spec: ContextSpec) -> str:
    return _dump({"instance-id": spec.instance_id, "local-hostname": spec.hostname})


def build_iso(files: dict[str, bytes]) -> bytes:
    """An ISO9660 image labelled ``cidata`` holding ``files`` (name -> content)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    try:
        for i, (name, content) in enumerate(sorted(files.items())):
            iso.add_fp(
                io.BytesIO(content),
                len(content),
                f"/FILE{i}.;1",
                rr_name=name,
                joliet_path=f"/{name}",
            )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


class NoCloud:
    """cloud-init NoCloud seed as a read-only virtio disk (faster than a CD-ROM here)."""

    name = "nocloud"

    def prepare(self, spec: ContextSpec, jobdir: JobDir) -> tuple[DiskSpec, ...]:
        image = build_iso(
            {
                "meta-data": meta_data(spec).encode(),
                "user-data": user_data(spec).encode(),
            }
        )
        # 0600 root: it holds the guest's private host key; libvirt re-owns it for QEMU.
        jobdir.write(jobdir.seed, image, mode=0o600)
        return (DiskSpec(jobdir.seed, "raw", readonly=True),)
