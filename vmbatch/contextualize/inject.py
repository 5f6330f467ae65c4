"""Offline injection: the job's identity is written into the overlay before boot.

For stock images with no contextualization agent (no cloud-init, no amiconfig). Only the
job's overlay is opened read-write; the base image is untouched (QEMU opens a backing file
read-only). The tool is libguestfs's ``guestfish`` (Debian's ``libguestfs-tools``; manual:
https://libguestfs.org/guestfish.1.html), chosen because it reads and writes a guest's
filesystems without mounting them on the host (no loop or nbd devices, no kernel trust in
a hostile filesystem: the guest disk is parsed by a kernel in a throw-away appliance VM),
handles partitions, LVM, ext2/3/4 and xfs, and finds the root filesystem by inspection.

One appliance serves the whole injection (it boots in ~17 s under TCG here, ~2 s with
KVM): ``guestfish --listen`` starts it, each step is a ``guestfish --remote`` call, and
the account files are edited in Python (:func:`add_account`, pure and unit-tested) between
reading and writing them. ``LIBGUESTFS_BACKEND=direct`` (no libvirtd round trip) and,
when vmbatch's accelerator probe chose TCG, ``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``
(libguestfs would otherwise try /dev/kvm, which hangs where nested KVM is broken;
https://libguestfs.org/guestfs.3.html#backend-settings). The appliance has no network.

``guestfish --listen`` forks a daemon that outlives its starter: if vmbatch is SIGKILLed
meanwhile (Slurm's PrologEpilogTimeout, Torque's prologalarm), nothing of vmbatch runs to
stop it, and the daemon, its recovery process and the appliance's QEMU (here all in the
session of the ``--listen`` command, QEMU a child of the daemon) would run as root for
ever. So every guestfish command carries a per-appliance tag in its environment
(:func:`vmbatch.process.kill_tagged`), written to ``inject-*/appliance.tag`` in the job
directory *before* the daemon starts (no window in which it runs unrecorded);
:func:`stop_leftovers`, called by :func:`vmbatch.lifecycle.teardown` before the job
directory goes, kills whatever still carries it. :meth:`Guestfish.close` uses the same
sweep after its orderly ``exit``.

What is written (paths in the guest):

- ``/etc/passwd``, ``/etc/group``, ``/etc/shadow``, ``/etc/gshadow`` (the last two if they
  exist): the job's user with its uid, primary gid and groups, locked password (``!``);
  the groups with the node's names and gids, by the rules of :mod:`.groups` (the same
  as the cloud-init methods' boot script; privileged groups are never given; a primary
  gid that is a privileged group of the image refuses the job);
- the home directory (0700) and ``~/.ssh/authorized_keys`` (0700/0600, owned by the user);
- ``/etc/ssh/ssh_host_ed25519_key`` (0600) and ``.pub``; every other ``ssh_host_*`` file
  is removed so sshd serves only the pinned key;
- ``/etc/ssh/sshd_config``: vmbatch's settings are put first (sshd keeps the first value
  of each keyword; :mod:`.sshd`, shared with the cloud-init methods): keys only (no
  password, keyboard-interactive or challenge-response), no root login, the ed25519 host
  key;
- with ``[mounts]`` only: ``/root/.ssh/authorized_keys`` holding just vmbatch's per-job
  admin key, and root logins by key allowed (vmbatch mounts the shares as root);
- ``/etc/hostname`` and a ``127.0.1.1`` line in ``/etc/hosts``.

Supported: Linux guests whose root filesystem is ext2/3/4 or xfs, with OpenSSH's sshd.
Anything else is refused with an :class:`~vmbatch.errors.ImageError` naming the reason
(the job is aborted: another node cannot do better). SELinux-enforcing images are refused:
files written offline carry no label. Files that exist keep their mode and owner.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from vmbatch import accel, faults, process
from vmbatch.config import Config
from vmbatch.contextualize import groups, sshd
from vmbatch.contextualize.base import ContextSpec
from vmbatch.errors import (
    CommandError,
    CommandTimeoutError,
    HostError,
    ImageError,
    InjectionToolError,
    VmBatchError,
)
from vmbatch.job import JobUser
from vmbatch.libvirt.domain import DiskSpec
from vmbatch.state import JobDir, atomic_write

log = logging.getLogger(__name__)

#: The injection's work directory in the job directory (``tempfile.mkdtemp`` prefix).
WORK_PREFIX = "inject-"
#: File in the work directory naming the appliance's process tag (see :func:`stop_leftovers`).
TAG_FILE = "appliance.tag"
#: Seconds for SIGKILLed appliance processes to be gone, and for an orderly exit before that.
KILL_WAIT = 10.0

SUPPORTED_FS = ("ext2", "ext3", "ext4", "xfs")
#: Beyond :data:`.sshd.AUTH_SETTINGS`: sshd serves only the pinned host key.
HOST_KEY_SETTING = "HostKey /etc/ssh/ssh_host_ed25519_key"
#: Account files larger than this are refused (a hostile image could fill the host).
MAX_READ = 16 * 2**20


def _entries(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _join(entries: list[list[str]]) -> str:
    return "".join(":".join(e) + "\n" for e in entries)


def add_account(
    user: JobUser,
    passwd: str,
    group: str,
    shadow: str | None,
    gshadow: str | None,
    today: int,
    privileged: Iterable[str] = groups.PRIVILEGED,
) -> tuple[str, str, str | None, str | None]:
    """Add ``user`` to the account databases; return the new (passwd, group, shadow, gshadow).

    An existing account of that name is accepted only with the same uid and gid (it is then
    left as it is, apart from group memberships); otherwise ImageError, as with NoCloud.
    The groups follow :mod:`.groups` (the node's names and gids; privileged groups never
    given; clashes with the image's groups logged). The password is locked (``!``): keys
    only.
    """
    pw = _entries(passwd)
    sh = _entries(shadow) if shadow is not None else None
    if any(len(e) < 7 for e in pw) or any(len(e) < 4 for e in _entries(group)):
        raise ImageError("the image's /etc/passwd or /etc/group is malformed; refused")
    mine = [e for e in pw if e[0] == user.name]
    if mine:
        if (mine[0][2], mine[0][3]) != (str(user.uid), str(user.gid)):
            raise ImageError(
                f"the image already has an account {user.name!r} with uid/gid"
                f" {mine[0][2]}/{mine[0][3]}, the job needs {user.uid}/{user.gid}",
                hint="remove the account from the image",
            )
    else:
        if any(e[2] == str(user.uid) for e in pw):
            log.warning("uid %d is also used by another account in the image", user.uid)
        pw.append([user.name, "x" if sh is not None else "!", str(user.uid), str(user.gid),
                   "", user.home, user.shell])  # fmt: skip
        if sh is not None and not any(e[0] == user.name for e in sh):
            sh.append([user.name, "!", str(today), "0", "99999", "7", "", "", ""])
    new_group, new_gshadow, notes = groups.apply(groups.plan(user, privileged), group, gshadow)
    for note in notes:
        log.warning("offline injection: groups: %s", note)
    return _join(pw), new_group, _join(sh) if sh is not None else None, new_gshadow


def sshd_config(original: str, user: JobUser | None, admin: bool = False) -> str:
    """vmbatch's settings first (:func:`.sshd.prepend`), then the image's own file unchanged.

    Root may log in (by key only) when it is the login user or vmbatch needs it (``admin``:
    mounts); its ``authorized_keys`` then holds vmbatch's key only.
    """
    root_ok = user is None or admin
    root = "PermitRootLogin prohibit-password" if root_ok else "PermitRootLogin no"
    return sshd.prepend(original, (HOST_KEY_SETTING, root))


def hosts_file(original: str, hostname: str) -> str:
    kept = [ln for ln in original.splitlines() if not re.match(r"\s*127\.0\.1\.1\s", ln)]
    return "\n".join([*kept, f"127.0.1.1\t{hostname}"]) + "\n"


class Guestfish:
    """One ``guestfish --listen`` appliance on the overlay, driven with ``--remote``.

    ``workdir`` (inside the job directory) receives the daemon's stderr and the tag file.
    """

    def __init__(self, cfg: Config, disk: Path, workdir: Path) -> None:
        self.cfg = cfg
        self.log = workdir / "guestfish.log"
        self.tag_file = workdir / TAG_FILE
        self.binary = str(cfg.tools.guestfish)
        self.disk = disk
        self.timeout = cfg.context.inject_timeout
        self.pid: int | None = None
        self.tag = process.new_tag()
        tcg = accel.choose(cfg).accel == "tcg"
        # The appliance (built by supermin from the host's packages on first use) is cached
        # with the images, not in /var/tmp where tmp cleaners could remove it mid-launch.
        self.env = {
            "LIBGUESTFS_BACKEND": "direct",
            "LIBGUESTFS_CACHEDIR": str(cfg.paths.cache_dir / "libguestfs"),
            process.TAG_VAR: self.tag,
        }
        if tcg:
            self.env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"

    def start(self) -> None:
        # Recorded before the daemon exists: teardown finds it even if we die right after.
        atomic_write(self.tag_file, self.tag.encode() + b"\n")
        res = process.run(
            [self.binary, "--listen", "--format=qcow2", "-a", str(self.disk)],
            timeout=self.timeout,
            env=self.env,
            # The daemon it forks keeps stderr open: a pipe would never reach EOF.
            stderr_path=self.log,
        )
        m = re.search(r"GUESTFISH_PID=(\d+)", res.stdout)
        if m is None:
            raise CommandError(f"guestfish --listen printed no PID: {res.stdout.strip()!r}")
        self.pid = int(m.group(1))

    def __call__(self, *args: str, timeout: float | None = None) -> str:
        if self.pid is None:
            raise CommandError("guestfish: the appliance is not running")
        res = process.run(
            [self.binary, f"--remote={self.pid}", "--", *args],
            timeout=timeout or self.cfg.tools.command_timeout,
            env=self.env,
        )
        return res.stdout

    def close(self) -> None:
        """Flush and stop the appliance, then kill whatever of it is left.

        The daemon gets an orderly ``exit`` and :data:`KILL_WAIT` seconds; then every
        process carrying the tag (a daemon that did not go, its recovery process and QEMU,
        ``--remote`` clients) is killed. Something that outlives SIGKILL is logged and its
        tag file kept for teardown, which tries again.
        """
        pid, self.pid = self.pid, None
        if pid is not None:
            with contextlib.suppress(VmBatchError):
                process.run(
                    [self.binary, f"--remote={pid}", "--", "exit"],
                    timeout=self.cfg.tools.command_timeout,
                    env=self.env,
                )
            process.wait_exit(pid, self.tag, KILL_WAIT)
        try:
            process.kill_tagged(self.tag, timeout=KILL_WAIT)
        except HostError as exc:
            log.error("guestfish appliance not stopped: %s", exc)
            return
        self.tag_file.unlink(missing_ok=True)


def stop_leftovers(jobdir: JobDir) -> list[int]:
    """Kill the appliance of an injection in ``jobdir`` that could not stop it; return PIDs.

    That happens when the injecting process was SIGKILLed (a prologue timeout) or
    :meth:`Guestfish.close` met a process that would not die. Raises HostError if some
    process survives SIGKILL for :data:`KILL_WAIT` seconds.
    """
    killed: list[int] = []
    for tag_file in sorted(jobdir.path.glob(f"{WORK_PREFIX}*/{TAG_FILE}")):
        try:
            tag = tag_file.read_text().strip()
        except OSError as exc:
            log.warning("cannot read %s: %s", tag_file, exc.strerror)
            continue
        if not process.TAG_PATTERN.fullmatch(tag):
            log.warning("ignoring %s: not a process tag", tag_file)
            continue
        pids = process.kill_tagged(tag, timeout=KILL_WAIT)
        if pids:
            log.warning(
                "killed %d process(es) of an injection appliance whose starter was killed"
                " (PIDs %s)",
                len(pids),
                " ".join(map(str, pids)),
            )
        killed += pids
    return killed


@contextlib.contextmanager
def appliance(cfg: Config, disk: Path, workdir: Path) -> Iterator[Guestfish]:
    """A running appliance with ``disk`` attached, always stopped afterwards.

    A failure to start it is the node's (libguestfs missing or broken): InjectionToolError.
    """
    gf = Guestfish(cfg, disk, workdir)
    try:
        try:
            gf.start()
            faults.point(cfg, "inject.daemon_started")
            gf("run", timeout=cfg.context.inject_timeout)
            faults.point(cfg, "inject.appliance_running")
        except CommandTimeoutError:
            raise
        except CommandError as exc:
            raise InjectionToolError(
                f"libguestfs could not start its appliance: {exc.message}",
                hint="run `libguestfs-test-tool` as root; the appliance needs a kernel in"
                " /boot (e.g. apt-get install linux-image-cloud-amd64)",
            ) from exc
        yield gf
    finally:
        gf.close()


class Inject:
    """Write the job's identity into ``jobdir.overlay``; nothing is attached."""

    name = "inject"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def prepare(self, spec: ContextSpec, jobdir: JobDir) -> tuple[DiskSpec, ...]:
        if spec.site_user_data:
            log.warning("[context].site_user_data is cloud-config: not applied by injection")
        tool = self.cfg.tools.guestfish
        if not os.access(tool, os.X_OK):
            raise InjectionToolError(
                f"offline injection needs {tool}, which is missing",
                hint="install libguestfs-tools (and a kernel for its appliance, e.g."
                " linux-image-cloud-amd64), or fix [tools].guestfish",
            )
        # In the job directory, so that teardown finds the appliance's tag file in it and
        # JobDir.remove() deletes it whatever happens here.
        work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=jobdir.path))
        try:
            (self.cfg.paths.cache_dir / "libguestfs").mkdir(mode=0o700, parents=True, exist_ok=True)
            with appliance(self.cfg, jobdir.overlay, work) as gf:
                self._inject(gf, spec, work)
        except (CommandTimeoutError, InjectionToolError):
            raise
        except CommandError as exc:
            raise ImageError(
                f"offline injection into the job's overlay failed: {exc.message}",
                hint="the image must be a Linux guest with an ext4 or xfs root filesystem and"
                ' OpenSSH; or set context = "nocloud" for images with cloud-init',
            ) from exc
        finally:
            if not (work / TAG_FILE).exists():  # else left for teardown: see Guestfish.close
                shutil.rmtree(work, ignore_errors=True)
        return ()

    def _inject(self, gf: Guestfish, spec: ContextSpec, work: Path) -> None:
        roots = gf("inspect-os").split()
        if len(roots) != 1:
            fs = gf("list-filesystems").strip().replace("\n", ", ") or "none"
            raise ImageError(
                "offline injection found "
                + ("no Linux root filesystem" if not roots else f"{len(roots)} systems")
                + f" in the image (filesystems: {fs})",
                hint="injection supports one Linux system on ext4 or xfs; use an image"
                ' with cloud-init (context = "nocloud") otherwise',
            )
        root = roots[0]
        kind, fstype = gf("inspect-get-type", root).strip(), gf("vfs-type", root).strip()
        if kind != "linux" or fstype not in SUPPORTED_FS:
            raise ImageError(
                f"offline injection supports Linux guests on {', '.join(SUPPORTED_FS)};"
                f" this image's root is {kind} on {fstype or 'an unknown filesystem'}",
                hint='use an image with cloud-init (context = "nocloud") or CernVM context',
            )
        mounts = [ln.split(": ", 1) for ln in gf("inspect-get-mountpoints", root).splitlines()]
        for mountpoint, device in sorted(mounts, key=lambda m: len(m[0])):
            gf("mount", device, mountpoint)
        if gf("is-file", "/etc/ssh/sshd_config").strip() != "true":
            raise ImageError(
                "offline injection: the image has no /etc/ssh/sshd_config",
                hint="install openssh-server in the image",
            )

        def read(path: str) -> str | None:
            if gf("is-file", path).strip() != "true":
                return None
            if int(gf("filesize", path)) > MAX_READ:
                raise ImageError(f"offline injection: {path} in the image is implausibly large")
            local = work / "read"
            gf("download", path, str(local))
            return local.read_text(errors="surrogateescape")

        def write(path: str, text: str, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
            """Write ``path``; a file that exists keeps its own mode and owner."""
            if gf("is-file", path).strip() == "true":
                st = dict(ln.split(": ", 1) for ln in gf("statns", path).splitlines() if ": " in ln)
                mode, owner = int(st["st_mode"]) & 0o7777, (int(st["st_uid"]), int(st["st_gid"]))
            local = work / "write"
            local.write_text(text, errors="surrogateescape")
            gf("upload", str(local), path)
            gf("chown", str(owner[0]), str(owner[1]), path)
            gf("chmod", f"0{mode:o}", path)

        selinux = read("/etc/selinux/config") or ""
        if re.search(r"^\s*SELINUX\s*=\s*enforcing\s*$", selinux, re.M):
            raise ImageError(
                "offline injection: the image runs SELinux enforcing, and files written"
                " offline carry no SELinux label (sshd would refuse the job's key)",
                hint='use context = "nocloud" for this image, or set SELINUX=permissive in it',
            )
        user = spec.user
        if user is not None:
            passwd, group = read("/etc/passwd"), read("/etc/group")
            if passwd is None or group is None:
                raise ImageError("offline injection: the image has no /etc/passwd or /etc/group")
            shadow, gshadow = read("/etc/shadow"), read("/etc/gshadow")
            new = add_account(
                user, passwd, group, shadow, gshadow, int(time.time() // 86400),
                spec.privileged_groups,
            )  # fmt: skip
            write("/etc/passwd", new[0], 0o644)
            write("/etc/group", new[1], 0o644)
            if new[2] is not None:
                write("/etc/shadow", new[2], 0o600)
            if new[3] is not None:
                write("/etc/gshadow", new[3], 0o600)
            home, owner = user.home, (user.uid, user.gid)
        else:
            home, owner = "/root", (0, 0)
        gf("mkdir-p", f"{home}/.ssh")
        gf("chown", str(owner[0]), str(owner[1]), home)
        gf("chmod", "0700", home)
        gf("chown", str(owner[0]), str(owner[1]), f"{home}/.ssh")
        gf("chmod", "0700", f"{home}/.ssh")
        keys = [*spec.authorized_keys, *(spec.admin_keys if user is None else ())]
        write(f"{home}/.ssh/authorized_keys", "".join(k + "\n" for k in keys),
              0o600, owner)  # fmt: skip
        if user is not None and spec.admin_keys:
            gf("mkdir-p", "/root/.ssh")
            gf("chmod", "0700", "/root/.ssh")
            write("/root/.ssh/authorized_keys", "".join(k + "\n" for k in spec.admin_keys),
                  0o600, (0, 0))  # fmt: skip
        gf("glob", "rm-f", "/etc/ssh/ssh_host_*")
        write("/etc/ssh/ssh_host_ed25519_key", spec.host_key.private_openssh, 0o600)
        write("/etc/ssh/ssh_host_ed25519_key.pub", spec.host_key.public_openssh + "\n", 0o644)
        settings = sshd_config(read("/etc/ssh/sshd_config") or "", user, bool(spec.admin_keys))
        write("/etc/ssh/sshd_config", settings, 0o644)
        write("/etc/hostname", spec.hostname + "\n", 0o644)
        write("/etc/hosts", hosts_file(read("/etc/hosts") or "", spec.hostname), 0o644)
        gf("umount-all")
        gf("shutdown", timeout=self.cfg.context.inject_timeout)
