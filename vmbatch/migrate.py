"""Live migration of one job's VM to another libvirtd, its disks copied while it runs.

The contract is libvirt's (libvirt 9.0, https://libvirt.org/migration.html and
``virDomainMigrate3`` in https://libvirt.org/html/libvirt-libvirt-domain.html), with the
facts collected in docs/research/suspend-checkpoint-migrate.md, section 5:

- ``VIR_MIGRATE_LIVE | VIR_MIGRATE_NON_SHARED_INC`` with ``VIR_MIGRATE_PARAM_MIGRATE_DISKS``
  naming the writable disks: QEMU mirrors only their top layer (the job's overlay, its
  scratch disk) over NBD; the backing chain (the image's base) "is expected to be present
  on the destination and to be exactly the same" (libvirt-domain.h). libvirt does not
  pre-create the top layers for ``_INC`` (``qemuMigrationDstPrecreateStorage``), so
  :func:`prepare_destination` does: same virtual size, same backing file, which is
  verified by size and SHA-256 on the destination and refused otherwise.
- Read-only disks (the NoCloud seed) are not copied by libvirt
  (``qemuMigrationAnyCopyDisk``): :func:`prepare_destination` copies them.
- The destination's XML (``VIR_MIGRATE_PARAM_DEST_XML``) renames the job's files into the
  destination directory and leaves out ``<memtune>``; the memory limit is set again live.
- No ``PERSIST_DEST``: the domain stays transient on the destination.
- Runtime ``hostfwd`` rules are not part of QEMU's migration stream (libslirp saves only
  guestfwd sockets and bootp state), so the SSH port forward is added again on the
  destination, on a port its kernel chooses.
- TCG's ``maximum`` CPU (and KVM's ``host-passthrough``) is whatever this QEMU build
  offers: libvirt only taints such a migration. It is refused unless both hypervisor
  versions are equal; a named CPU model (``[vm].tcg_cpu_model``) is left to libvirt's and
  QEMU's own checks.

A batch job's VM (:func:`migrate_job`, ``vmbatch migrate JOB``): the job's starter keeps
its endpoint, the source's loopback port, which a relay of ``vmbatch agent`` takes over
after the switch (:mod:`vmbatch.relay`); across the switch the job is paused for the
reason ``migration`` (:mod:`vmbatch.pausing`: the starter's note only, the VM runs), so
the starter makes no attempt and counts no time while its connection is down. The job's
state record stays on this node and says where the VM now runs (:attr:`Record.migrated_to`,
``migrated_dir``): the epilogue and ``vmbatch cleanup`` tear it down there. See
docs/admin-guide.md, "Live migration", for what real multi-node migration still needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from vmbatch import agent, lifecycle, pausing, process, relay, state
from vmbatch.config import Config
from vmbatch.errors import (
    JobError,
    LibvirtError,
    MigrationError,
    MigrationRefusedError,
    VmBatchError,
)
from vmbatch.hooks.jobstate import READY, Record, StateStore
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import (
    migration_xml,
    read_boot_files,
    read_cpu_mode,
    read_disks,
    read_files,
    read_memory_limit_mib,
    read_uuid,
)

log = logging.getLogger(__name__)

#: CPU modes whose guest-visible CPU is "whatever this hypervisor build offers".
_HOST_CPU_MODES = frozenset({"maximum", "host-passthrough", "host-model"})
#: Files created with no access for others (libvirt re-owns the disks for QEMU).
_PRIVATE_UMASK = 0o077
_CHUNK = 1 << 20
#: Seconds ``vmbatch migrate`` waits for the agent's relay to listen (it looks every
#: [agent] interval, a fraction of a second).
RELAY_WAIT = 15.0


@dataclass(frozen=True, slots=True)
class FileCheck:
    """A file that must be the same on both hosts, at the same path."""

    path: Path
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class DiskMove:
    """One disk of the domain and where it goes on the destination."""

    target: str
    source: Path
    dest: Path
    format: str
    readonly: bool
    #: Virtual size in bytes of a writable disk (its destination top layer gets the same).
    virtual_size: int = 0
    backing: FileCheck | None = None
    backing_format: str = ""
    #: The backing file's own backing files, if it has any: the whole chain must match.
    chain: tuple[FileCheck, ...] = ()


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """What a migration of domain ``name`` moves, and what the destination must have."""

    name: str
    disks: tuple[DiskMove, ...]
    #: Kernel, initrd, firmware the domain booted from: must exist identically (a reboot
    #: of the guest on the destination reads them).
    boot_files: tuple[FileCheck, ...]
    #: Other host files the XML names (the console log) and their destination paths.
    moves: tuple[tuple[Path, Path], ...]
    memory_limit_mib: int | None
    cpu_mode: str
    #: The XML the destination starts the domain from.
    dest_xml: str

    @property
    def migrated_disks(self) -> tuple[str, ...]:
        return tuple(d.target for d in self.disks if not d.readonly)


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """A finished migration, with libvirt's figures (``virDomainGetJobStats``)."""

    name: str
    dest_uri: str
    #: How long the guest did not run (ms): the stop-and-copy phase plus the switch-over.
    downtime_ms: int | None
    #: The whole migration job (ms), as libvirt measured it.
    total_ms: int | None
    #: The guest's memory, and what went over the wire for it (re-sent dirty pages
    #: included, zero pages compacted).
    memory_bytes: int | None
    memory_transferred: int | None
    #: Disk bytes libvirt counted; the destination's libvirt 9.0 does not see the NBD
    #: mirror (it runs at the source), so 0 there for ``NON_SHARED_INC``.
    disk_bytes: int | None
    #: Wall time of the whole call, preparation included (s).
    elapsed_s: float
    #: The loopback port on the destination host that now reaches the guest's SSH server.
    ssh_port: int


def migrate(
    cfg: Config,
    conn: Connection,
    name: str,
    dest_uri: str,
    dest_dir: Path,
    *,
    uri: str | None = None,
    disks_uri: str | None = None,
    timeout: float = 600.0,
) -> MigrationResult:
    """Live-migrate the running domain ``name`` from ``conn``'s libvirtd to ``dest_uri``'s.

    The job's files (disks, console log) go into ``dest_dir``, which must be on this host's
    file system (the destination's libvirtd must reach the same paths): same file names,
    new directory. ``uri``/``disks_uri``: see :meth:`Connection.migrate`.

    Raises :class:`MigrationRefusedError` (nothing was changed) when the domain is not
    running here, the destination already has a domain of that name, the hypervisors differ
    for a host-dependent CPU, or a backing or boot file is missing or different there; and
    :class:`MigrationError` when libvirt's migration failed (the domain runs on here; what
    was prepared on the destination is removed again).
    """
    started = time.monotonic()
    status = conn.status(name)
    if status is None or status.state not in ("running", "paused"):
        state = "gone" if status is None else status.state
        raise MigrationRefusedError(f"cannot migrate {name}: the domain is {state}, not running")
    dest_cfg = dataclasses.replace(cfg.libvirt, uri=dest_uri)
    with Connection(dest_cfg) as dest:
        if dest.status(name) is not None:
            raise MigrationRefusedError(
                f"cannot migrate {name}: {dest_uri} already runs a domain of that name"
            )
        plan = make_plan(cfg, conn, name, dest_dir)
        _check_hypervisors(conn, dest, plan, dest_uri)
        created = prepare_destination(cfg, plan)
        log.info("migrating %s to %s (disks %s)", name, dest_uri, ",".join(plan.migrated_disks))
        try:
            conn.migrate(
                name,
                dest,
                dest_xml=plan.dest_xml,
                disks=plan.migrated_disks,
                uri=uri,
                disks_uri=disks_uri,
                timeout=timeout,
            )
        except LibvirtError as exc:
            _remove(created)
            raise MigrationError(
                f"migration of {name} to {dest_uri} failed: {exc.message}",
                hint="the VM runs on at the source",
            ) from exc
        return _finish(cfg, conn, dest, plan, dest_uri, started)


def _finish(
    cfg: Config,
    conn: Connection,
    dest: Connection,
    plan: MigrationPlan,
    dest_uri: str,
    started: float,
) -> MigrationResult:
    name = plan.name
    status = dest.status(name)
    if status is None or status.state not in ("running", "paused"):
        raise MigrationError(f"{name} is not running on {dest_uri} after its migration")
    if conn.status(name) is not None:
        raise MigrationError(f"{name} still exists at the source after its migration")
    try:
        if plan.memory_limit_mib is not None:
            dest.set_memory_limit(name, plan.memory_limit_mib)
        port = dest.forward_port(name, cfg.ssh.port)
        stats = dest.completed_job_stats(name)
    except VmBatchError as exc:
        raise MigrationError(
            f"{name} was migrated to {dest_uri}, but setting it up there failed: {exc}",
            hint="it runs there without its memory limit or SSH forward; destroy it or"
            " finish by hand",
        ) from exc
    result = MigrationResult(
        name=name,
        dest_uri=dest_uri,
        downtime_ms=stats.get("downtime"),
        total_ms=stats.get("time_elapsed"),
        memory_bytes=stats.get("memory_total"),
        memory_transferred=stats.get("memory_processed"),
        disk_bytes=stats.get("disk_total"),
        elapsed_s=time.monotonic() - started,
        ssh_port=port,
    )
    log.info(
        "%s runs on %s: downtime %s ms, migration %s ms, SSH on 127.0.0.1:%d there",
        name,
        dest_uri,
        result.downtime_ms,
        result.total_ms,
        port,
    )
    return result


def make_plan(cfg: Config, conn: Connection, name: str, dest_dir: Path) -> MigrationPlan:
    """Read the running domain's disks and files and say where each goes in ``dest_dir``."""
    xml = conn.xml(name, migratable=True)
    disks = []
    for disk in read_disks(xml):
        dest = dest_dir / disk.path.name
        if disk.readonly:
            disks.append(DiskMove(disk.target, disk.path, dest, disk.format, readonly=True))
            continue
        top, *below = _image_chain(cfg, disk.path)
        backing = _backing_of(top)
        disks.append(
            DiskMove(
                disk.target,
                disk.path,
                dest,
                disk.format,
                readonly=False,
                virtual_size=int(str(top["virtual-size"])),
                backing=_file_check(Path(backing)) if backing else None,
                backing_format=str(top.get("backing-filename-format", "")),
                chain=tuple(_file_check(Path(p)) for b in below if (p := _backing_of(b))),
            )
        )
    disk_paths = {d.source for d in disks}
    moves = tuple(
        (Path(f), dest_dir / Path(f).name) for f in read_files(xml) if Path(f) not in disk_paths
    )
    all_moves = {**{d.source: d.dest for d in disks}, **dict(moves)}
    return MigrationPlan(
        name=name,
        disks=tuple(disks),
        boot_files=tuple(_file_check(p) for p in read_boot_files(xml)),
        moves=moves,
        memory_limit_mib=read_memory_limit_mib(conn.xml(name)),
        cpu_mode=read_cpu_mode(xml),
        # The destination's reaper must not take it for a lost VM of a job it never ran.
        dest_xml=migration_xml(xml, all_moves, hosted_for=os.uname().nodename),
    )


def prepare_destination(cfg: Config, plan: MigrationPlan) -> list[Path]:
    """On the destination host: verify the backing and boot files, create the writable
    disks' empty top layers and copy the read-only disks. Returns what it created.

    Refuses (:class:`MigrationRefusedError`, having removed what it made) when a file the
    destination must share is missing or differs, or a destination file already exists
    (never overwrite: on one host the same path would be the source's own disk).
    """
    chains = [c for d in plan.disks for c in (*((d.backing,) if d.backing else ()), *d.chain)]
    for check in [*chains, *plan.boot_files]:
        _verify_same(check)
    targets = [d.dest for d in plan.disks] + [dst for _, dst in plan.moves]
    for path in targets:
        if path.exists():
            raise MigrationRefusedError(
                f"cannot migrate {plan.name}: {path} exists on the destination",
                hint="give an empty destination directory",
            )
    created: list[Path] = []
    try:
        for directory in sorted({p.parent for p in targets}):
            if not directory.exists():
                # 0711 as a job directory: QEMU (another user) reaches the files in it.
                directory.mkdir(mode=0o711, parents=True)
                directory.chmod(0o711)
                created.append(directory)
        for disk in plan.disks:
            if disk.readonly:
                _copy_private(disk.source, disk.dest)
            else:
                _create_top(cfg, disk)
            created.append(disk.dest)
    except BaseException:
        _remove(created)
        raise
    return created


def _check_hypervisors(
    conn: Connection, dest: Connection, plan: MigrationPlan, dest_uri: str
) -> None:
    (_, here), (_, there) = conn.version(), dest.version()
    if plan.cpu_mode in _HOST_CPU_MODES and here != there:
        raise MigrationRefusedError(
            f"cannot migrate {plan.name}: its CPU (mode {plan.cpu_mode}) is whatever QEMU"
            f" {here} offers, and {dest_uri} runs QEMU {there}",
            hint="migrate between identical QEMU builds, or give the VMs a named CPU model"
            " ([vm].tcg_cpu_model)",
        )


def _image_chain(cfg: Config, path: Path) -> list[dict[str, object]]:
    """``qemu-img info --backing-chain``: the image, then each backing file down the chain."""
    # -U (--force-share): the running QEMU holds the image's write lock.
    res = process.run(
        [str(cfg.tools.qemu_img), "info", "-U", "--backing-chain", "--output=json", str(path)],
        timeout=cfg.tools.command_timeout,
    )
    chain = json.loads(res.stdout)
    if not isinstance(chain, list) or not chain or not all(isinstance(i, dict) for i in chain):
        raise MigrationError(f"qemu-img info {path}: unexpected output")
    return chain


def _backing_of(info: dict[str, object]) -> str:
    return str(info.get("full-backing-filename") or info.get("backing-filename") or "")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_check(path: Path) -> FileCheck:
    try:
        return FileCheck(path, path.stat().st_size, _sha256(path))
    except OSError as exc:
        raise MigrationRefusedError(f"cannot read {path} at the source: {exc.strerror}") from exc


def _verify_same(check: FileCheck) -> None:
    """The destination has ``check.path`` with the same size and SHA-256 (size first: cheap)."""
    try:
        size = check.path.stat().st_size
    except OSError as exc:
        raise MigrationRefusedError(
            f"{check.path} is missing on the destination ({exc.strerror})",
            hint="install the same image (and kernel) on the destination node first",
        ) from exc
    if size != check.size or _sha256(check.path) != check.sha256:
        raise MigrationRefusedError(
            f"{check.path} differs on the destination (size or SHA-256)",
            hint="both nodes need the identical image: the copied top layer is only valid"
            " on the very same backing file",
        )


def _create_top(cfg: Config, disk: DiskMove) -> None:
    """An empty file of ``disk``'s format and virtual size on the same backing file: the
    NBD mirror writes the source's top layer into it."""
    argv = [str(cfg.tools.qemu_img), "create", "-q", "-f", disk.format]
    if disk.backing is not None:
        argv += ["-F", disk.backing_format or "raw", "-b", str(disk.backing.path)]
    process.run(
        [*argv, str(disk.dest), str(disk.virtual_size)],
        timeout=cfg.tools.command_timeout,
        umask=_PRIVATE_UMASK,
    )


def _copy_private(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new file ``dst`` (mode 0600 from creation; libvirt re-owns it)."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
        while chunk := inp.read(_CHUNK):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _remove(paths: list[Path]) -> None:
    for path in reversed(paths):
        try:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s after the failed migration: %s", path, exc)


# -- a batch job's VM ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobMigration:
    """A batch job whose VM now runs at ``result.dest_uri``, reached through the relay."""

    job_id: str
    result: MigrationResult
    dest_dir: Path
    relay_port: int
    relay_to: str


def migrate_job(
    cfg: Config,
    job_id: str,
    dest_uri: str,
    *,
    dest_base: Path | None = None,
    uri: str | None = None,
    disks_uri: str | None = None,
    timeout: float = 600.0,
    relay_wait: float = RELAY_WAIT,
) -> JobMigration:
    """Live-migrate the running VM of batch job ``job_id`` to ``dest_uri``'s libvirtd, its
    files into ``dest_base/<job>`` (default ``[paths].job_dir``: the same path on the
    destination node), and keep its starter's endpoint working (module docstring).

    The job's lock is held only to read and write its record: the epilogue of a job that
    ends meanwhile is not kept waiting; its teardown then destroys the VM at the source,
    which aborts the migration, or the VM is destroyed at the destination here.

    Raises :class:`JobError` (no running batch job here), :class:`MigrationRefusedError`
    (nothing changed: no agent runs to relay, migrated already, or :func:`migrate`
    refused), :class:`MigrationError` (the VM runs on at the source, or runs at the
    destination but its relay did not start: said in the message).
    """
    store = StateStore(cfg.batch.state_dir)
    base = dest_base or cfg.paths.job_dir
    dest_dir = state.JobDir(base, job_id).path
    with store.exclusive(job_id, wait=5.0):
        record = _migratable(cfg, store, job_id, dest_uri)
        if dest_dir == state.JobDir(cfg.paths.job_dir, job_id).path and _local(dest_uri):
            raise MigrationRefusedError(
                f"cannot migrate job {job_id} to {dest_uri}: its files would go to {dest_dir},"
                " the job's directory here",
                hint="the destination runs on this host: give it its own --dest-dir",
            )
        with Connection(cfg.libvirt) as conn:
            guest_uuid = read_uuid(conn.xml(record.domain))
            port = conn.ssh_port(record.domain, cfg.ssh.port)
            if port is None:
                raise MigrationRefusedError(f"job {job_id}: its VM has no SSH port forward here")
            # Before the switch: the starter's connection drops then, and must not count.
            record = pausing.add(cfg, store, conn, record, pausing.MIGRATION)
    try:
        with Connection(cfg.libvirt) as conn:
            result = migrate(
                cfg, conn, record.domain, dest_uri, dest_dir, uri=uri, disks_uri=disks_uri,
                timeout=timeout,
            )  # fmt: skip
    except BaseException:
        _drop_pause(cfg, store, job_id)
        raise
    try:
        to = _record_migration(cfg, store, record, dest_uri, base, guest_uuid, result, port)
        listens = _wait_relay(port, relay_wait)
    finally:
        _drop_pause(cfg, store, job_id)
    if not listens:
        raise MigrationError(
            f"job {job_id}: its VM runs at {dest_uri}, but no relay listens on 127.0.0.1:{port}"
            f" within {relay_wait:.0f}s: its starter cannot reach it",
            hint="see `journalctl -u vmbatch-agent` (is the port taken?)",
        )
    return JobMigration(job_id, result, dest_dir, port, to)


def _record_migration(
    cfg: Config,
    store: StateStore,
    record: Record,
    dest_uri: str,
    base: Path,
    guest_uuid: str,
    result: MigrationResult,
    port: int,
) -> str:
    """Write where the VM runs now and the relay the agent is to run; the relay's target.
    A job that ended meanwhile (its epilogue found no VM here) has its VM ended there too."""
    job_id = record.job_id
    to, netns = _relay_target(cfg, dest_uri, guest_uuid, result.ssh_port)
    netns_ino = Path(netns).stat().st_ino if netns else 0
    with store.exclusive(job_id, wait=30.0):
        current = store.read(job_id)
        if current is None or current.phase != READY or current.domain != record.domain:
            with Connection(dataclasses.replace(cfg.libvirt, uri=dest_uri)) as there:
                lifecycle.teardown(cfg, there, record.domain, state.JobDir(base, job_id))
            raise MigrationError(
                f"job {job_id} ended while its VM migrated; its VM at {dest_uri} is destroyed"
            )
        store.write(
            dataclasses.replace(
                current,
                migrated_to=dest_uri,
                migrated_dir=str(state.JobDir(base, job_id).path),
                relay_port=port,
                relay_to=to,
                relay_netns=netns,
                relay_netns_ino=netns_ino,
            )
        )
    return to


def _migratable(
    cfg: Config,
    store: StateStore,
    job_id: str,
    dest_uri: str,
) -> Record:
    record = store.read(job_id)
    if record is None:
        raise JobError(
            f"no batch job {job_id} on this node (no state record)",
            hint="`vmbatch ps` lists the jobs here",
        )
    if record.phase != READY or not record.domain:
        raise JobError(
            f"job {job_id} is {record.phase}, not running: only a running job's VM migrates",
            hint="`vmbatch ps` shows its phase",
        )
    if record.migrated_to:
        raise MigrationRefusedError(
            f"job {job_id}: its VM runs at {record.migrated_to} already; migrating it again"
            " is not supported"
        )
    if pausing.vm_paused(record.pauses) or pausing.MIGRATION in record.pauses:
        raise MigrationRefusedError(
            f"job {job_id} is paused ({', '.join(record.pauses)}); migrate it once it runs"
        )
    if agent.running(cfg) is None:
        raise MigrationRefusedError(
            f"cannot migrate job {job_id}: no `vmbatch agent` runs on this node, and its"
            " relay is what lets the job's starter reach the VM after the move",
            hint="systemctl start vmbatch-agent",
        )
    if dest_uri == cfg.libvirt.uri:
        raise MigrationRefusedError(f"cannot migrate job {job_id}: {dest_uri} is this node's")
    return record


def _drop_pause(cfg: Config, store: StateStore, job_id: str) -> None:
    with store.exclusive(job_id, wait=30.0):
        current = store.read(job_id)
        if current is not None and pausing.MIGRATION in current.pauses:
            # A note-only reason: the domain is not touched, the connection never opened
            # (a libvirtd that does not answer must not keep the starter waiting).
            pausing.drop(cfg, store, Connection(cfg.libvirt), current, pausing.MIGRATION)


def _local(dest_uri: str) -> bool:
    host = urllib.parse.urlsplit(dest_uri).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1")


def _relay_target(cfg: Config, dest_uri: str, guest_uuid: str, port: int) -> tuple[str, str]:
    """Where the relay connects ("host:port") and from which network namespace ("": ours).

    A destination on another host: its host name (its forward must then be reachable from
    here, which QEMU's loopback-only ``hostfwd`` is not: docs/admin-guide.md). On this
    host: the destination QEMU's own network namespace, found by its ``-uuid`` (the
    migration kept it; the source's QEMU is gone)."""
    if not _local(dest_uri):
        host = urllib.parse.urlsplit(dest_uri).hostname or ""
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), ""
    from vmbatch.reaper import qemu_namespaces  # the reaper imports hooks that import us

    found = qemu_namespaces(cfg.tools.qemu_system, guest_uuid)
    mine = Path("/proc/self/ns/net").stat().st_ino
    if found is None or found[1] == mine:
        return f"127.0.0.1:{port}", ""
    return f"127.0.0.1:{port}", found[0]


def _wait_relay(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not relay.listening(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling the agent's relay, bounded by the deadline
    return True


__all__ = [
    "DiskMove",
    "FileCheck",
    "JobMigration",
    "MigrationPlan",
    "MigrationResult",
    "make_plan",
    "migrate",
    "migrate_job",
    "prepare_destination",
]
