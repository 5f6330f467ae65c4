"""The pipeline of one job's VM: image -> disks -> seed -> create -> wait for SSH -> mount ->
run -> teardown.

With ``[mounts]`` configured, the first login is root's, with a per-job admin key that only
this process holds (every contextualization method installs it for root only then): the
shared filesystems are mounted (see :mod:`vmbatch.guest.mounts`), root logs out, and the
job's user logs in. Without mounts no key for root exists.

The image is resolved (fetched into the node cache if needed) and marked in use by the job
until teardown; the free-space guard runs before any per-job disk is created.

Teardown always runs (success, error, SIGINT/SIGTERM at any stage, boot included) and is
idempotent: destroy the domain (already gone counts as done), kill what is left of an
offline injection's appliance (its starter was SIGKILLed: see
:func:`vmbatch.contextualize.inject.stop_leftovers`), then remove the job directory with the
overlay, seed and keys; the console log is kept only if ``[paths].console_log_dir`` is set.
Every stage's duration is recorded for ``bench/boot.py`` and logged at INFO
(:func:`vmbatch.logsetup.stage`). The per-job keys are registered as secrets
(:func:`vmbatch.logsetup.secret`) the moment they exist: no log line can carry them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import paramiko

from vmbatch import __version__, accel, faults, limits, logsetup, signals
from vmbatch.config import Config
from vmbatch.contextualize import ContextSpec, get_method, groups, inject, nocloud
from vmbatch.contextualize.keys import KeyPair, generate
from vmbatch.errors import (
    GuestConnectionError,
    HostError,
    ImageError,
    LibvirtTimeoutError,
    LibvirtUnavailableError,
    VmBatchError,
)
from vmbatch.guest import mounts, ssh
from vmbatch.guest.session import ENV_DENY, GuestJob, Session, command_script, job_environment
from vmbatch.images.cache import ImageCache
from vmbatch.images.catalog import resolve
from vmbatch.images.disks import DiskBudget, check_free_space, job_disks
from vmbatch.job import JobSpec, JobUser
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import DomainSpec, JobMetadata, build_xml, domain_name
from vmbatch.retry import LIBVIRT_TEARDOWN_POLICY, SSH_CONNECT_POLICY
from vmbatch.state import JobDir, process_identity

log = logging.getLogger(__name__)

#: Phases in the order they happen; ``bench/boot.py`` prints them in this order.
PHASES = (
    "image",
    "disks",
    "seed",
    "create",
    "wait_ssh",
    "mount",
    "start",
    "command",
    "teardown",
)


class PhaseTimer:
    """Records how long each phase took into a caller-supplied mapping."""

    def __init__(self, sink: MutableMapping[str, float] | None) -> None:
        self.sink: MutableMapping[str, float] = sink if sink is not None else {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.sink[phase] = time.monotonic() - start
            logsetup.stage(log, phase, self.sink[phase])


def console_tail(jobdir: JobDir, lines: int = 15) -> str:
    """The last lines of the guest's serial console, for error messages."""
    try:
        text = jobdir.console_log.read_bytes()[-8192:].decode("utf-8", "replace")
    except OSError:
        return "  (no console output)"
    tail = [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join("  | " + ln for ln in tail) or "  (no console output)"


@dataclass
class Guest:
    """A booted job VM, logged in as the job's user (see :func:`booted`)."""

    cfg: Config
    job: JobSpec
    name: str
    endpoint: ssh.Endpoint
    client: paramiko.SSHClient
    is_alive: Callable[[], bool]
    conn: Connection
    jobdir: JobDir
    #: The catalog image and, if it is a cached copy marked in use by this job, its path.
    image: str = ""
    image_path: Path | None = None
    sessions: list[Session] = field(default_factory=list)
    #: Restored from this generation of the job's checkpoint (None: booted afresh).
    restored: int | None = None

    def release_image(self) -> None:
        """The job no longer uses its cached image (it may be evicted); idempotent."""
        if self.image_path is not None:
            ImageCache(self.cfg).release(self.image_path, self.job.job_id)

    def session(self, gjob: GuestJob) -> Session:
        """A :class:`Session` for ``gjob`` in this guest (reconnecting with the same keys).

        It starts on the newest live connection (an SSH login costs seconds under TCG);
        channels of several sessions can share one connection.
        """
        live = [c for c in (self.client, *(s.client for s in self.sessions)) if _active(c)]
        session = Session(
            connect=lambda: ssh.connect(self.endpoint),
            is_alive=self.is_alive,
            job=gjob,
            reconnect_timeout=self.cfg.ssh.reconnect_timeout,
            liveness_interval=self.cfg.ssh.liveness_interval,
            liveness_timeout=self.cfg.ssh.connect_timeout,
            client=live[-1] if live else None,
            watch=DiskBudget(self.cfg, self.jobdir),
        )
        self.sessions.append(session)
        return session

    def guest_job(self) -> GuestJob:
        """The job's own script, environment, working directory and walltime."""
        job = self.job
        return GuestJob(
            job_id=job.job_id,
            script=job.script if job.script is not None else command_script(job.argv),
            environment=job_environment(
                job.environment, ENV_DENY | frozenset(self.cfg.job.env_deny)
            ),
            workdir=job.workdir,
            walltime=job.walltime,
            kill_grace=self.cfg.job.kill_grace,
            image=self.image or job.image,
        )

    def close(self) -> None:
        """Close the first login and every session's current connection."""
        for client in (self.client, *(s.client for s in self.sessions)):
            if client is not None:
                client.close()  # paramiko: closing twice is harmless


def _active(client: paramiko.SSHClient | None) -> bool:
    transport = client.get_transport() if client is not None else None
    return transport is not None and transport.is_active()


def run_job(
    cfg: Config,
    job: JobSpec,
    out: BinaryIO,
    err: BinaryIO,
    *,
    conn: Connection | None = None,
    timings: MutableMapping[str, float] | None = None,
) -> int:
    """Boot a fresh VM for ``job``, run its command, tear everything down; return the status."""
    timer = PhaseTimer(timings)
    with booted(cfg, job, conn=conn, timer=timer) as guest:
        session = guest.session(guest.guest_job())
        with timer("start"):
            session.start()
        with timer("command"):
            return session.follow(out, err)


@contextmanager
def booted(
    cfg: Config,
    job: JobSpec,
    *,
    conn: Connection | None = None,
    timer: PhaseTimer | None = None,
) -> Iterator[Guest]:
    """Boot a fresh VM for ``job`` and log in; tear everything down when the block ends.

    Termination signals raise JobInterruptedError (except while a Session forwards them to
    the job); teardown always runs.
    """
    timer = timer or PhaseTimer(None)
    with signals.interruptible():
        guest = start_vm(cfg, job, conn, timer=timer)
        try:
            yield guest
        finally:
            with timer("teardown"), signals.deferred():
                guest.close()
                try:
                    teardown(cfg, guest.conn, guest.name, guest.jobdir)
                finally:
                    guest.release_image()
                    if conn is None:
                        guest.conn.close()


#: Decides, for a failure after the job's domain was made, whether its VM is kept for
#: inspection: "paused", "disks", or None (torn down as usual).
KeepPolicy = Callable[[BaseException], str | None]


def start_vm(
    cfg: Config,
    job: JobSpec,
    conn: Connection | None = None,
    *,
    timer: PhaseTimer,
    keep: KeepPolicy | None = None,
) -> Guest:
    """Boot a fresh VM for ``job`` and log in as its user; return it running.

    Without ``conn`` a connection to libvirtd is opened once the job's request checked out
    (an unknown image is the job's fault even when libvirtd is down); ``Guest.conn`` holds it
    and the caller closes it.

    The caller owns the result: :func:`teardown` and :meth:`Guest.release_image` end it
    (the batch prologue leaves it running for the job starter). If anything fails, or a
    termination signal arrives (raised as JobInterruptedError when the caller runs under
    :func:`signals.interruptible`), what was made so far is torn down before the error
    propagates. Domain name and job directory follow from the job id alone
    (:func:`domain_name`, :class:`JobDir`), so a crash at any point can be cleaned up.

    ``keep``: for a failure after the domain was made, the batch prologue may keep the VM
    for inspection (``[batch].keep_failed``): paused (``virDomainSuspend``), or destroyed
    with its job directory left; the image stays marked in use, and :class:`KeptError`
    wraps the failure so the caller records it.
    """
    choice = accel.choose(cfg)
    log.info("accelerator: %s (%s)", choice.accel, choice.reason)
    jobdir = JobDir(cfg.paths.job_dir, job.job_id)
    name = domain_name(job.job_id)
    created = False
    made = False  # the domain exists
    own_conn = conn is None
    client: paramiko.SSHClient | None = None
    with timer("image"):
        image = resolve(cfg, job.image, allow_path=job.allow_image_path, job_id=job.job_id)
    release = ImageCache(cfg).release if image.cached else None
    faults.point(cfg, "start.image_resolved")
    try:
        check_free_space(cfg)
        with signals.deferred():
            jobdir.create()
            created = True
            if job.scheduler == "none":  # vmbatch run: no epilogue; the reaper needs this
                owner = process_identity(os.getpid()) or ""
                jobdir.write(jobdir.owner, owner.encode(), 0o644)
        faults.point(cfg, "start.jobdir_created")
        if conn is None:
            conn = Connection(cfg.libvirt).open()
        live = conn
        with timer("disks"):
            disks = job_disks(cfg, image, jobdir)
        faults.point(cfg, "start.disks_created")
        privileged = groups.PRIVILEGED | frozenset(cfg.context.privileged_groups)
        if job.identity is not None:
            for group, gid in groups.plan(job.identity, privileged).skipped:
                log.warning(
                    "group %s (gid %d) of %s is not given in the guest: a privileged group"
                    " (built-in list and [context].privileged_groups)",
                    group,
                    gid,
                    job.user,
                )
        with timer("seed"):
            client_key = generate(f"vmbatch-{job.job_id}")
            host_key = generate(f"vmbatch-host-{job.job_id}")
            admin_key = generate(f"vmbatch-admin-{job.job_id}") if cfg.mounts else None
            for key in (client_key, host_key, admin_key):
                if key is not None:
                    logsetup.secret(key.private_openssh)
            ctx = ContextSpec(
                instance_id=f"vmbatch-{job.job_id}",
                hostname=name[:63],
                user=job.identity,
                site_user_data=(
                    nocloud.load_site_user_data(cfg.context.site_user_data)
                    if cfg.context.site_user_data
                    else {}
                ),
                authorized_keys=(client_key.public_openssh,),
                host_key=host_key,
                admin_keys=(admin_key.public_openssh,) if admin_key else (),
                privileged_groups=privileged,
            )
            seed_disks = get_method(image.context, cfg).prepare(ctx, jobdir)
        faults.point(cfg, "start.seed_written")
        memory = job.memory or image.memory
        limit = job.memory_limit
        if limit is None and cfg.limits.memory_limit:
            limit = limits.hard_limit_mib(cfg, memory, choice.domain_type)
        spec = DomainSpec(
            name=name,
            domain_type=choice.domain_type,
            memory_mib=memory,
            vcpus=job.vcpus or image.vcpus,
            machine=cfg.vm.machine,
            disks=(*disks, *seed_disks),
            console_log=jobdir.console_log,
            metadata=JobMetadata(job.job_id, job.user, job.scheduler, image.name, __version__),
            emulator=cfg.tools.qemu_system,
            tcg_cpu_model=cfg.vm.tcg_cpu_model,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=image.cmdline,
            firmware=image.firmware,
            outbound_network=cfg.vm.outbound_network,
            cpuset=tuple(sorted(job.cpus)),
            tb_cache_mib=cfg.vm.tcg_tb_cache_mib,
        )
        with timer("create"):
            with signals.deferred():  # a VM started must be known to teardown
                conn.create(name, build_xml(spec), memory_limit_mib=limit)
                made = True
            faults.point(cfg, "start.domain_created")
            port = conn.forward_port(name, cfg.ssh.port)
        faults.point(cfg, "start.port_forwarded")
        log.info("VM %s started, SSH forwarded to 127.0.0.1:%d", name, port)
        endpoint = ssh.Endpoint(
            port=port,
            user=job.identity.name if job.identity else cfg.ssh.user,
            client_key=client_key,
            host_key=host_key,
            connect_timeout=cfg.ssh.connect_timeout,
            keepalive_interval=cfg.ssh.keepalive_interval,
        )
        save_login(jobdir, endpoint, admin_key)
        first = endpoint
        if admin_key is not None:
            first = dataclasses.replace(endpoint, user="root", client_key=admin_key)
        with timer("wait_ssh"):
            try:
                client = ssh.wait_for_ssh(
                    first,
                    cfg.vm.boot_timeout,
                    is_alive=lambda: live.is_running(name),
                    console_tail=lambda: console_tail(jobdir),
                )
            except GuestConnectionError as exc:
                if admin_key is not None:
                    exc.hint = (
                        "[mounts] need vmbatch to log in as root by key: the image's sshd"
                        " must allow it (PermitRootLogin prohibit-password)"
                    )
                raise
        faults.point(cfg, "start.ssh_ready")
        if admin_key is not None:
            with timer("mount"):
                mounts.mount_all(client, cfg.mounts.values(), image.name)
            client.close()
            client = _login(endpoint)
        if job.identity is not None:
            verify_identity(client, job.identity, image.name, privileged)
        return Guest(
            cfg,
            job,
            name,
            endpoint,
            client,
            lambda: live.is_running(name),
            conn=live,
            jobdir=jobdir,
            image=image.name,
            image_path=image.path if release is not None else None,
        )
    except BaseException as exc:
        mode = keep(exc) if (keep is not None and made and conn is not None) else None
        if mode is not None and conn is not None:
            with signals.deferred():
                kept = _keep_failed(cfg, conn, name, mode, client)
            if kept:
                if own_conn:
                    conn.close()
                raise KeptError(exc, mode) from exc
        with timer("teardown"), signals.deferred():
            try:
                teardown(cfg, conn, name, jobdir if created else None, client)
            finally:
                if release is not None:
                    release(image.path, job.job_id)
                if own_conn and conn is not None:
                    conn.close()
        raise


class KeptError(Exception):
    """:func:`start_vm` failed after the VM was made, and kept it ``mode`` ("paused" or
    "disks") for inspection instead of tearing it down; ``error`` is the failure."""

    def __init__(self, error: BaseException, mode: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.mode = mode


def _keep_failed(
    cfg: Config, conn: Connection, name: str, mode: str, client: paramiko.SSHClient | None
) -> bool:
    """Pause the VM, or destroy it leaving its files; False (logged) if libvirt refused."""
    if client is not None:
        client.close()
    try:
        if mode == "paused":
            conn.suspend(name)
        else:
            teardown(cfg, conn, name, None)
    except VmBatchError as exc:
        log.warning("could not keep VM %s for inspection (%s); tearing it down", name, exc)
        return False
    return True


def save_login(jobdir: JobDir, endpoint: ssh.Endpoint, admin_key: KeyPair | None) -> None:
    """Keep the guest's login in the job directory's root-only ``keys/`` (0700, files 0600):
    ``login.json`` (port, user, the pinned host key), the job user's private key and, where
    the guest authorizes one for root (only with ``[mounts]``), root's. ``vmbatch ssh`` run
    by root reads them from there, never from the job user's own directory."""
    info = {
        "host": endpoint.host,
        "port": endpoint.port,
        "user": endpoint.user,
        "host_key": endpoint.host_key.public_openssh,
    }
    try:
        jobdir.write(jobdir.login, (json.dumps(info, sort_keys=True) + "\n").encode())
        jobdir.write(jobdir.user_key, endpoint.client_key.private_openssh.encode())
        if admin_key is not None:
            jobdir.write(jobdir.admin_key, admin_key.private_openssh.encode())
    except OSError as exc:
        raise HostError(
            f"cannot write the guest's login into {jobdir.keys}: {exc.strerror}",
            hint="check free space in [paths].job_dir",
        ) from exc


def _login(endpoint: ssh.Endpoint) -> paramiko.SSHClient:
    """Log in as the job's user (after root's login for the mounts)."""
    for attempt in SSH_CONNECT_POLICY.retrying():
        with attempt:
            return ssh.connect(endpoint)
    raise AssertionError("unreachable: the retry policy re-raises")  # pragma: no cover


#: What :func:`verify_identity` runs in the guest: one line each for uid, gid, the primary
#: group's name, the gids and the names of all groups (a number where a gid has no name).
IDENTITY_COMMAND = (
    'id -u; id -g; echo "$(id -gn 2>/dev/null)"; echo "$(id -G)"; echo "$(id -Gn 2>/dev/null)"'
)


def verify_identity(
    client: paramiko.SSHClient,
    user: JobUser,
    image: str,
    privileged: frozenset[str] = groups.PRIVILEGED,
) -> None:
    """Refuse to run the job unless the guest account is the job's (see :func:`check_identity`).

    Contextualization cannot always enforce it (cloud-init skips an account that already
    exists in the image; a primary gid may be a privileged group of the image), so it is
    checked, fail-closed, before the job's command runs.
    """
    out, err = io.BytesIO(), io.BytesIO()
    status = ssh.run(client, ("sh", "-c", IDENTITY_COMMAND), out, err)
    check_identity(
        status, out.getvalue().decode(errors="replace"), groups.plan(user, privileged), user, image
    )


def check_identity(
    status: int, output: str, plan: groups.GroupPlan, user: JobUser, image: str
) -> None:
    """The guest account must have exactly the job's uid and gid and no privileged group.

    ``output`` is :data:`IDENTITY_COMMAND`'s. Groups the node gives but the guest does not
    (left out by the rules of :mod:`vmbatch.contextualize.groups`) are logged.
    """
    lines = [*output.splitlines(), "", "", "", "", ""]
    uid, gid = (lines[0].strip() or "?"), (lines[1].strip() or "?")
    if status != 0 or (uid, gid) != (str(user.uid), str(user.gid)):
        raise ImageError(
            f"image {image!r}: the guest account {user.name!r} has uid/gid"
            f" {uid}/{gid}, expected {user.uid}/{user.gid}; the job was not started",
            hint="the image has a conflicting account of that name; remove it from the image",
        )
    primary, gids, names = lines[2].strip(), lines[3].split(), lines[4].split()
    groups.check_guest(plan, primary, names, image)
    missing = sorted({g for _, g in plan.members} - {int(g) for g in gids if g.isdigit()})
    log.info("job user %s in the guest: groups %s (gids %s)", user.name, " ".join(names),
             " ".join(gids))  # fmt: skip
    if missing:
        log.warning(
            "gid(s) %s of %s are not given in the guest (see its console log)",
            " ".join(map(str, missing)),
            user.name,
        )


def _destroy(cfg: Config, conn: Connection, name: str) -> bool:
    """``conn.destroy(name)``; while libvirtd is dead or hangs, again on fresh connections
    (``LIBVIRT_TEARDOWN_POLICY`` until ``[libvirt].teardown_timeout``): a libvirtd that is
    restarted or resumes meanwhile still gets the VM destroyed, not left running."""
    try:
        return conn.destroy(name)
    except (LibvirtUnavailableError, LibvirtTimeoutError) as exc:
        log.warning("could not destroy VM %s (%s); trying again on a new connection", name, exc)
    for attempt in LIBVIRT_TEARDOWN_POLICY.retrying(max_delay=cfg.libvirt.teardown_timeout):
        with attempt, Connection(cfg.libvirt) as fresh:
            return fresh.destroy(name)
    raise AssertionError("unreachable: the retry policy re-raises")  # pragma: no cover


def teardown(
    cfg: Config,
    conn: Connection | None,
    name: str,
    jobdir: JobDir | None,
    client: paramiko.SSHClient | None = None,
) -> None:
    """Destroy the VM, stop a leftover injection appliance, remove the job's files.

    Safe to call twice and after partial set-up. The appliance is looked for through the
    job directory (a SIGKILLed prologue leaves it running, see :func:`inject.stop_leftovers`),
    so before the directory goes. Files are removed even if the destroy or the kill fails
    (QEMU keeps its open files); the first error is raised afterwards so the caller reports
    it.
    """
    failure: VmBatchError | None = None
    if client is not None:
        client.close()
    if conn is not None:
        try:
            if _destroy(cfg, conn, name):
                log.info("destroyed VM %s", name)
        except VmBatchError as exc:
            log.error("could not destroy VM %s: %s", name, exc)
            failure = exc
        faults.point(cfg, "teardown.destroyed")
    if jobdir is not None:
        try:
            inject.stop_leftovers(jobdir)
        except HostError as exc:
            log.error("could not stop the injection appliance of %s: %s", jobdir.path, exc)
            failure = failure or exc
        keep = cfg.paths.console_log_dir
        if keep is not None and jobdir.console_log.exists():
            try:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(jobdir.console_log, keep / f"{jobdir.path.name}.log")
            except OSError as exc:
                log.warning("could not keep the console log in %s: %s", keep, exc)
        jobdir.remove()
        faults.point(cfg, "teardown.jobdir_removed")
    if failure is not None:
        raise failure
