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

sshd: ``ssh_pwauth: false`` only turns off ``PasswordAuthentication`` (set-passwords module,
config stage); keyboard-interactive, through which PAM asks for the same password, stays as
the image has it. So the first ``bootcmd`` puts vmbatch's block (:mod:`.sshd`, the lines
offline injection writes) at the top of ``/etc/ssh/sshd_config``, where the first value
wins over the files of Debian 12's ``Include /etc/ssh/sshd_config.d/*.conf`` and, on images
without that ``Include``, over the rest of the file. A ``write_files`` drop-in in
``sshd_config.d`` would lose to any drop-in sorting before it and is never read without the
``Include``. ``bootcmd`` (https://cloudinit.readthedocs.io/en/latest/reference/modules.html
#bootcmd: "run arbitrary commands early in the boot process", string items run by
``/bin/sh``, on every boot) runs in the init stage, and ``cloud-init.service`` is ordered
``Before=sshd.service`` (cloud-init ``systemd/cloud-init.service.tmpl``), so sshd starts on
the edited file; the command skips a file that already has the block (a guest reboot). An
image whose cloud-init does not run ``bootcmd`` keeps its own sshd settings (and would miss
the job's groups too).

The job's user (``users``, cloud-init's users-groups module, 22.4 as in Debian 12): name,
``uid``, ``primary_group`` by *number*, ``homedir``, ``shell``, ``lock_passwd: true`` (no
password login) and the per-job key in ``ssh_authorized_keys``; no ``default`` entry, so the
image's default user gets no key; ``create_groups: false``, because cloud-init would
otherwise create a group *named* "4242" for a numeric group; no ``groups``: the job's
groups, with the node's names and gids, and its memberships are made by the second
``bootcmd`` (which runs before users-groups), the script of
:func:`vmbatch.contextualize.groups.boot_script` (its module doc has the rules: privileged
groups are never given, clashes with the image's groups are resolved and logged). It is
a multi-line string, so the dumper writes it as a literal block (the tiny test guest runs
the literal-block items of ``bootcmd``). All values are validated by
:class:`~vmbatch.job.JobUser` and quoted with ``shlex.quote`` as well.
Root gets no key and ``disable_root: true``, unless the site mounts shared filesystems: then
vmbatch's per-job admin key goes to root through a ``users`` entry named ``root`` (for an
existing user cloud-init skips the creation but still installs ``ssh_authorized_keys``;
``disable_root`` only concerns keys given at the top level).

The site's snippet (``[context].site_user_data``) is merged, not concatenated: its lists are
appended after ours, its other keys added; keys that would change who can log in (see
:data:`RESERVED_KEYS`) and ``write_files`` into SSH or account files are refused with a
ConfigError naming the key, because a mistake there would open the guest to others.

A pre-existing account of the same name keeps its uid (cloud-init skips existing users);
vmbatch checks ``id`` after login and refuses.

Generated from Python data with a YAML dumper (multi-line strings as literal blocks), never
from text templates. The ISO is built in-process with pycdlib, with Rock Ridge and Joliet
names so every reader sees ``user-data``/``meta-data``. The tiny test guest's init parses the
same files, relying on this exact layout (see ``guests/tiny/init``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from vmbatch.config import Config
from vmbatch.contextualize import sshd
from vmbatch.contextualize.base import ContextSpec
from vmbatch.contextualize.groups import boot_script, plan
from vmbatch.errors import ConfigError
from vmbatch.libvirt.domain import DiskSpec
from vmbatch.state import JobDir

VOLUME_ID = "cidata"

#: cloud-config keys vmbatch sets itself or that change who can log in; a site snippet
#: may not contain them (cloud-config module docs: users-groups, ssh, set-passwords,
#: set-hostname, update-hostname, ssh-import-id).
RESERVED_KEYS = frozenset(
    {
        "users",
        "user",
        "groups",
        "ssh_authorized_keys",
        "ssh_keys",
        "ssh_pwauth",
        "disable_root",
        "disable_root_opts",
        "allow_public_ssh_keys",
        "ssh_deletekeys",
        "ssh_genkeytypes",
        "ssh_import_id",
        "ssh_publish_hostkeys",
        "chpasswd",
        "password",
        "hostname",
        "fqdn",
        "preserve_hostname",
        "prefer_fqdn_over_hostname",
        "create_hostname_file",
    }
)
#: write_files may not touch these (paths compared after normalisation).
_PROTECTED_PATHS = (
    ".ssh/",
    "/etc/ssh/",
    "/etc/passwd",
    "/etc/shadow",
    "/etc/group",
    "/etc/gshadow",
    "/etc/sudoers",
)


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


def user_data(spec: ContextSpec) -> str:
    """The ``#cloud-config`` document for ``spec``."""
    data: dict[str, Any] = {
        "hostname": spec.hostname,
        "disable_root": spec.user is not None,
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],
    }
    data["bootcmd"] = [sshd.prepend_command()]
    user = spec.user
    if user is None:
        data["ssh_authorized_keys"] = [*spec.authorized_keys, *spec.admin_keys]
    else:
        data["bootcmd"].append(boot_script(plan(user, spec.privileged_groups)))
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
        data["users"] = [entry]
        if spec.admin_keys:
            root = {"name": "root", "lock_passwd": True, "ssh_authorized_keys": [*spec.admin_keys]}
            data["users"].append(root)
    data["ssh_keys"] = {
        "ed25519_private": spec.host_key.private_openssh,
        "ed25519_public": spec.host_key.public_openssh,
    }
    _merge_site(data, spec.site_user_data)  # checked by load_site_user_data
    return "#cloud-config\n" + _dump(data)


def check_site_user_data(data: Any, source: str) -> dict[str, Any]:
    """Validate a site snippet; return it as a dict or raise ConfigError listing problems."""
    if not isinstance(data, dict):
        raise ConfigError(["must be a YAML mapping of cloud-config keys"], source=source)
    problems = [
        f"key {key!r} is reserved: vmbatch sets accounts, SSH keys, passwords and the"
        " hostname itself; remove it"
        for key in sorted(data, key=str)
        if key in RESERVED_KEYS
    ]
    for item in data.get("write_files") or []:
        path = str(item.get("path", "")) if isinstance(item, dict) else ""
        norm = "/" + "/".join(p for p in path.split("/") if p not in ("", "."))
        if ".." in norm.split("/") or any(m in norm + "/" for m in _PROTECTED_PATHS):
            problems.append(f"write_files path {path!r} touches SSH or account files; refused")
    if problems:
        raise ConfigError(problems, source=source)
    return data


def load_site_user_data(path: Path) -> dict[str, Any]:
    """Read and check ``[context].site_user_data``."""
    where = f"[context].site_user_data {path}"
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError([f"cannot read it: {exc.strerror}"], source=where) from exc
    except yaml.YAMLError as exc:
        # Not str(exc): PyYAML quotes the offending line, which may hold a site's secret.
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError([f"not valid YAML{at}: {problem}"], source=where) from exc
    return check_site_user_data(data, where)


def _merge_site(data: dict[str, Any], site: Mapping[str, Any]) -> None:
    for key, value in site.items():
        mine = data.get(key)
        if isinstance(mine, list) and isinstance(value, list):
            data[key] = [*mine, *value]  # ours first: e.g. groups exist before site bootcmd
        elif key not in data:
            data[key] = value


def meta_data(spec: ContextSpec) -> str:
    return _dump({"instance-id": spec.instance_id, "local-hostname": spec.hostname})


def build_iso(files: dict[str, bytes], label: str = VOLUME_ID) -> bytes:
    """An ISO9660 image labelled ``label`` holding ``files`` (name -> content)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=label, joliet=3, rock_ridge="1.09")
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

    def __init__(self, cfg: Config | None = None) -> None:
        del cfg  # nothing site-specific beyond the snippet, which comes in the spec

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
