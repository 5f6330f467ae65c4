"""CernVM / HEPiX context: a multipart user-data on a ``CONTEXT`` CD and a NoCloud volume.

CernVM reads its context with three agents that each take what they understand from one
user-data (CernVM docs, "Contextualization",
https://cernvm.readthedocs.io/en/stable/cpt-context.html): the µCernVM bootloader, amiconfig
and cloud-init. vmbatch writes one MIME ``multipart/mixed`` user-data, as CernVM's own
``amiconfig-mime`` does (cernvm/amiconfig ``cernvm/commands/amiconfig-mime``), with parts in
this order:

1. ``text/cloud-config``: exactly the NoCloud user-data of :mod:`.nocloud` (job user with
   uid/gid, per-job key, pinned host key, hostname, site snippet, and the ``bootcmd`` that
   puts :mod:`.sshd`'s settings at the top of ``sshd_config``: no password,
   keyboard-interactive or challenge-response logins; that placement also works for
   CernVM 4's EL7 sshd (OpenSSH 7.4), whose ``sshd_config`` has no ``Include``, and
   ``ChallengeResponseAuthentication no`` is what keeps keyboard-interactive off there).
   This part creates the account: amiconfig's ``[cernvm] users`` cannot set a uid, puts
   the first user in ``wheel`` and gives an empty password a random one (cernvm/amiconfig
   ``cernvm/amiconfig/plugins/cernvm.py``), so vmbatch never emits ``users``.
   It comes first because amiconfig drops every line before the first ``[section]``
   (sassoftware/amiconfig ``amiconfig/userdata.py``), so its YAML never reaches amiconfig.
2. ``text/amiconfig-user-data``: ini, ``[amiconfig] plugins=cernvm hostname`` (plugin names
   split on whitespace), ``[cernvm]`` with ``repositories``, ``proxy``, ``organisations``
   and ``shell`` where configured (``[context]`` keys), and ``[hostname] hostname=``.
3. ``text/ucernvm`` (only if a proxy is configured): ``[ucernvm-begin]``
   ``cvmfs_http_proxy="..."`` ``[ucernvm-end]``, keys without spaces around ``=``, the
   value double-quoted because the bootloader sources the block with sh (cernvm/cernvm-micro
   ``README.md`` and ``packages.d/extras/src/parse_user_data.cc``).

Every part is us-ascii with ``7bit`` transfer encoding and ``\\n`` line ends: µCernVM and
amiconfig scan the raw text and would not see base64-encoded parts. cloud-init acts on
``text/cloud-config`` and ignores the two unknown types with a warning
(cloud-init ``cloudinit/user_data.py``; ``text/plain`` would be content-sniffed).

Delivery, two read-only volumes:

- a HEPiX/OpenNebula-style context CD: ISO9660 labelled ``CONTEXT`` with ``context.sh`` in
  OpenNebula's format (first line a comment, then ``KEY='value'`` lines with ``'`` written
  as ``'\\''``; OpenNebula/one ``src/vm/VirtualMachineContext.cc``): ``EC2_USER_DATA``
  (base64 of the user-data: what amiconfig-hepix's ``setupContext`` and µCernVM's
  ``06context`` decode), ``ONE_CONTEXT_PATH`` (required by the CernVM docs' CD recipe),
  ``USER_DATA`` with ``USERDATA_ENCODING='base64'`` (cloud-init's OpenNebula datasource)
  and ``SET_HOSTNAME``; plus the plain ``user-data`` file for readers that look for one;
- a NoCloud ``cidata`` volume with the same user-data and the usual ``meta-data``, for
  CernVM 4's cloud-init (NoCloud is first in its ``datasource_list``) and any plain
  cloud-init image.

Deliberately absent, because each would let someone other than the job's user in:
``PUBLIC_KEY``/``ROOT_PUBKEY``/``SSH_PUBLIC_KEY`` (root's authorized_keys via amiconfig's
``rootsshkeys`` or OpenNebula's context agent), ``USERNAME`` (one-context creates it with
any uid and passwordless sudo) and ``[cernvm] users``. All values come from validated
inputs (:class:`~vmbatch.job.JobUser`, ``[context]`` rules in :mod:`vmbatch.config`) and are
also quoted; none can add a line, a section or a shell command.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from vmbatch.config import Config
from vmbatch.contextualize import nocloud
from vmbatch.contextualize.base import ContextSpec
from vmbatch.libvirt.domain import DiskSpec
from vmbatch.state import JobDir

CONTEXT_LABEL = "CONTEXT"
#: MIME subtypes, as CernVM's documentation names them.
CLOUD_CONFIG, AMICONFIG, UCERNVM = "cloud-config", "amiconfig-user-data", "ucernvm"


@dataclass(frozen=True, slots=True)
class CernvmOptions:
    """The site's CernVM settings (``[context]``), validated by the config rules."""

    repositories: tuple[str, ...] = ()
    http_proxy: str = ""
    organisations: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> CernvmOptions:
        c = cfg.context
        return cls(c.cvmfs_repositories, c.cvmfs_http_proxy, c.cernvm_organisations)


def _line_safe(value: str) -> str:
    """Refuse a value that could end an ini line or a shell word (inputs are validated)."""
    if any(c in value for c in "\n\r\0") or not value.isascii():
        raise ValueError(f"unsafe context value {value!r}")
    return value


def amiconfig(spec: ContextSpec, opts: CernvmOptions) -> str:
    """The amiconfig ini part (``[amiconfig]``, ``[cernvm]``, ``[hostname]``)."""
    cernvm: list[tuple[str, str]] = []
    if opts.organisations:
        cernvm.append(("organisations", ",".join(opts.organisations)))
    if opts.repositories:
        cernvm.append(("repositories", ",".join(opts.repositories)))
    if opts.http_proxy:
        cernvm.append(("proxy", opts.http_proxy))
    if spec.user is not None:
        cernvm.append(("shell", spec.user.shell))
    lines = ["[amiconfig]", "plugins=cernvm hostname", "", "[cernvm]"]
    lines += [f"{k}={_line_safe(v)}" for k, v in cernvm]
    lines += ["", "[hostname]", f"hostname={_line_safe(spec.hostname)}", ""]
    return "\n".join(lines)


def ucernvm(opts: CernvmOptions) -> str | None:
    """The µCernVM bootloader block, or None when there is nothing to tell it."""
    if not opts.http_proxy:
        return None
    proxy = _line_safe(opts.http_proxy)
    if any(c in proxy for c in '"$`\\'):
        raise ValueError(f"unsafe proxy {proxy!r}")
    return f'[ucernvm-begin]\ncvmfs_http_proxy="{proxy}"\n[ucernvm-end]\n'


def user_data(spec: ContextSpec, opts: CernvmOptions) -> str:
    """The multipart/mixed user-data (see the module doc for the order and encodings)."""
    parts: list[tuple[str, str, str]] = [
        (CLOUD_CONFIG, "cloud-init-user-data", nocloud.user_data(spec)),
        (AMICONFIG, "amiconfig-user-data", amiconfig(spec, opts)),
    ]
    block = ucernvm(opts)
    if block is not None:
        parts.append((UCERNVM, "ucernvm-user-data", block))
    message = MIMEMultipart()
    for subtype, filename, text in parts:
        part = MIMEText(text, subtype, "us-ascii")  # 7bit: readable by line scanners
        part.add_header("Content-Disposition", "attachment", filename=filename)
        message.attach(part)
    return message.as_string(policy=message.policy.clone(linesep="\n"))


def _sh(value: str) -> str:
    """OpenNebula's quoting: ``'value'`` with every ``'`` written as ``'\\''``."""
    return "'" + _line_safe(value).replace("'", "'\\''") + "'"


def context_sh(spec: ContextSpec, data: str) -> str:
    """``context.sh`` for the ``CONTEXT`` CD (see the module doc for each variable)."""
    encoded = base64.b64encode(data.encode("ascii")).decode("ascii")
    variables = {
        "EC2_USER_DATA": encoded,
        "ONE_CONTEXT_PATH": "/var/lib/amiconfig",
        "USER_DATA": encoded,
        "USERDATA_ENCODING": "base64",
        "SET_HOSTNAME": spec.hostname,
    }
    lines = ["# Context variables generated by vmbatch"]
    lines += [f"{key}={_sh(value)}" for key, value in variables.items()]
    return "\n".join(lines) + "\n"


class CernVM:
    """CernVM/HEPiX context CD plus a NoCloud volume, both read-only virtio disks."""

    name = "cernvm"

    def __init__(self, cfg: Config) -> None:
        self.options = CernvmOptions.from_config(cfg)

    def prepare(self, spec: ContextSpec, jobdir: JobDir) -> tuple[DiskSpec, ...]:
        data = user_data(spec, self.options)
        context = nocloud.build_iso(
            {"context.sh": context_sh(spec, data).encode(), "user-data": data.encode()},
            label=CONTEXT_LABEL,
        )
        seed = nocloud.build_iso(
            {"meta-data": nocloud.meta_data(spec).encode(), "user-data": data.encode()}
        )
        # 0600 root: both hold the guest's private host key; libvirt re-owns them for QEMU.
        jobdir.write(jobdir.context_iso, context, mode=0o600)
        jobdir.write(jobdir.seed, seed, mode=0o600)
        return (
            DiskSpec(jobdir.context_iso, "raw", readonly=True),
            DiskSpec(jobdir.seed, "raw", readonly=True),
        )
