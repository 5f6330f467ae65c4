"""Live migration (vmbatch/migrate.py) between two real libvirtds on this machine, each in
network and mount namespaces the test made (tests/system/libvirt_pair.py): a VM built from
vmbatch's own domain XML, counting on its console, moves while it runs; on the destination
the count goes on without a gap or a restart, the guest's SSH server answers on the port
forward re-added there, its disk writes were copied, and the source has no domain left.

Then a batch job (Torque-style hooks on the machine's libvirtd, `vmbatch agent` running)
whose VM `vmbatch migrate` moves to a namespaced libvirtd mid-output: it ends with its
complete output and its exit status with no help from the test, and its epilogue tears the
VM down where it then runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.system.conftest import TEST_BASE, BatchSite
from tests.system.libvirt_pair import (
    QEMU,
    LibvirtPair,
    NamespacedLibvirtd,
    guest_ssh,
    make_socket_dir,
    start_counter_vm,
    wait_console,
)
from tests.system.test_torque import Mom
from vmbatch import migrate, relay
from vmbatch.config import Config, LibvirtConfig
from vmbatch.errors import MigrationRefusedError
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name, read_metadata
from vmbatch.reaper import find_qemus

_COUNT = re.compile(rb"count (\d+)\r?\n")


def _counts(log: Path) -> list[int]:
    try:
        return [int(m.group(1)) for m in _COUNT.finditer(log.read_bytes())]
    except FileNotFoundError:
        return []


#: The guest's instance id and the marker it wrote to its disk at the source, read from the
#: disk itself (the page cache dropped first: it came along with the memory).
READ = (
    "echo 3 >/proc/sys/vm/drop_caches;"
    " echo $(cat /run/tiny/instance-id) $(dd if=/dev/vda bs=512 skip=4096 count=1 2>/dev/null)"
)


def _wait_count(log: Path, at_least: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(counts := _counts(log)) < at_least:
        assert time.monotonic() < deadline, f"{log}: {log.read_bytes()[-2000:]!r}"
        time.sleep(0.1)  # polling with a deadline
    return counts


@pytest.fixture
def pair() -> Iterator[LibvirtPair]:
    TEST_BASE.mkdir(parents=True, exist_ok=True)
    root = TEST_BASE / f"mig-{uuid.uuid4().hex[:8]}"
    try:
        with LibvirtPair(root) as p:
            yield p
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_running_vm_migrates_live_and_its_work_goes_on_at_the_destination(
    pair: LibvirtPair, guest_dir: Path
) -> None:
    cfg = Config()
    src_dir, dst_dir = pair.base / "job-src", pair.base / "job-dst"
    src = Connection(LibvirtConfig(uri=pair.src.uri)).open()
    dst = Connection(LibvirtConfig(uri=pair.dst.uri)).open()
    name = ""
    try:
        vm = start_counter_vm(src, guest_dir, src_dir)
        name, job_id = vm.name, vm.job_id
        before = _wait_count(src_dir / "console.log", 5)
        assert before == list(range(1, len(before) + 1))
        # The guest writes to its disk (the overlay's top layer) before the migration.
        marker = uuid.uuid4().hex
        wait_console(src_dir / "console.log", b"vmbatch-tiny: ssh ready")
        port = src.forward_port(name, 22)
        write = f"echo {marker} | dd of=/dev/vda bs=512 seek=4096 conv=fsync 2>/dev/null"
        guest_ssh(pair.netns[0], vm, port, write)

        # Refused, nothing changed: a domain the source does not have.
        with pytest.raises(MigrationRefusedError, match="is gone, not running"):
            migrate.migrate(cfg, src, "vmbatch-nosuch", pair.dst.uri, dst_dir)
        assert not dst_dir.exists()

        result = migrate.migrate(
            cfg,
            src,
            name,
            pair.dst.uri,
            dst_dir,
            uri=f"unix://{pair.sockets}/memory.sock",
            disks_uri=f"unix://{pair.sockets}/disks.sock",
        )

        assert src.status(name) is None
        assert src.raw.listAllDomains(0) == []
        status = dst.status(name)
        assert status is not None and status.state == "running"
        # The counter goes on at the destination: its console log (a new file there)
        # continues the source's, no number lost or repeated, and the guest did not boot.
        src_log = (src_dir / "console.log").read_bytes()
        n_src = len(_COUNT.findall(src_log))
        _wait_count(dst_dir / "console.log", 5)
        dst_log = (dst_dir / "console.log").read_bytes()
        counts = [int(c) for c in _COUNT.findall(src_log + dst_log)]
        assert counts == list(range(1, len(counts) + 1))
        assert len(counts) >= n_src + 5
        assert b"vmbatch-tiny: seed" in src_log
        assert b"vmbatch-tiny" not in dst_log  # no second boot

        # The SSH forward was added again, on the destination's loopback: the same guest
        # (its instance id, its pinned host key) answers there, and what it wrote to its
        # disk at the source was copied.
        assert guest_ssh(pair.netns[1], vm, result.ssh_port, READ) == f"{job_id} {marker}\n"

        assert result.downtime_ms is not None and result.downtime_ms >= 0
        assert result.total_ms is not None and result.total_ms >= result.downtime_ms
        assert result.memory_bytes is not None and result.memory_bytes > 0
        print(
            f"\nmigration: downtime {result.downtime_ms} ms, total {result.total_ms} ms,"
            f" memory {result.memory_bytes} B, disks {result.disk_bytes} B,"
            f" call {result.elapsed_s:.2f} s"
        )
    finally:
        for conn in (src, dst):
            if name:
                conn.destroy(name)
            conn.close()


#: A batch job printing a numbered line 5 times a second for 8 s, then exiting 5: the
#: migration (about 1 s) starts after its 5th line.
JOB = "#!/bin/sh\ni=0\nwhile [ $i -lt 40 ]; do i=$((i+1)); echo count $i; sleep 0.2; done\nexit 5\n"


class _Reader:
    """Collects a pipe's bytes in a thread; :meth:`wait_for` waits (bounded) for a text."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.data = bytearray()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._thread.start()

    def _run(self, pipe: IO[bytes]) -> None:
        while chunk := pipe.read1(65536):  # type: ignore[attr-defined]
            with self._changed:
                self.data += chunk
                self._changed.notify_all()

    def wait_for(self, text: bytes, timeout: float = 120) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: text in self.data, timeout), bytes(self.data)

    def done(self, timeout: float = 30) -> bytes:
        self._thread.join(timeout)
        return bytes(self.data)


def _relay_gone(port: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while relay.listening(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)  # polling the agent's next sweep, with a deadline
    return True


def test_vmbatch_migrate_moves_a_running_batch_job_which_ends_complete_and_is_torn_down_there(
    batch_site: BatchSite, libvirt_conn: Connection, agent: Path
) -> None:
    """A Torque-style job (prologue, starter, epilogue as pbs_mom calls them) on the
    machine's libvirtd, with `vmbatch agent` running; `vmbatch migrate` moves its VM to a
    libvirtd in a namespace of the test's while the job prints, and nothing else helps:
    the output is complete and in order, the exit status the job's, the starter came back
    through the agent's relay on its old port; the epilogue destroys the VM at the
    destination and removes its files there, and the relay stops."""
    bs = batch_site
    cfg = Config()
    dest = NamespacedLibvirtd(bs.site.root / "dst")
    sockets = make_socket_dir(bs.site.root / "sockets")
    dest_base = bs.site.root / "dst-jobs"
    mom = Mom(bs, JOB)
    name = domain_name(mom.job_id)
    ended = False
    try:
        dest.start()
        pro = mom.prologue()
        assert pro.returncode == 0, pro.stderr.decode()
        starter = mom.starter()
        assert starter.stdout is not None and starter.stderr is not None
        out, err = _Reader(starter.stdout), _Reader(starter.stderr)
        out.wait_for(b"count 5\n")
        old_port = libvirt_conn.ssh_port(name, cfg.ssh.port)
        assert old_port is not None
        # The machine's libvirtd has numbered many domains: its cgroup name differs from
        # the destination's first (qemu-1-NAME), so each keeps its own cgroup.
        assert libvirt_conn.raw.lookupByName(name).ID() != 1
        limit = libvirt_conn.raw.lookupByName(name).memoryParameters(0)["hard_limit"]
        assert limit < 2**40  # set by the prologue ([limits].memory_limit), not unlimited
        assert [q.name for q in find_qemus(bs.site.job_dir, QEMU)] == [name]

        # Refused, nothing changed: a job this node does not run.
        nosuch = bs.site.vmbatch("migrate", "999999", "--to", dest.uri)
        assert nosuch.returncode == 65, nosuch.stderr.decode()
        assert b"no batch job 999999 on this node" in nosuch.stderr

        moved = bs.site.vmbatch(
            "migrate", mom.job_id, "--to", dest.uri, "--dest-dir", str(dest_base),
            "--migrate-uri", f"unix://{sockets}/memory.sock",
            "--disks-uri", f"unix://{sockets}/disks.sock",
        )  # fmt: skip
        assert moved.returncode == 0, moved.stderr.decode()
        assert f"127.0.0.1:{old_port} here".encode() in moved.stdout, moved.stdout
        assert libvirt_conn.status(name) is None
        with Connection(LibvirtConfig(uri=dest.uri)) as there:
            # The memory limit left out of the destination's XML holds there again.
            assert there.raw.lookupByName(name).memoryParameters(0)["hard_limit"] == limit
            # Whose job it is, for the destination's reaper, which has no record of it.
            meta = read_metadata(there.xml(name))
            assert meta is not None and meta.hosted_for == os.uname().nodename
        # The destination's QEMU runs on this host with files like a job's, but in the
        # other libvirtd's namespaces: it is not this node's to reap.
        assert (dest_base / mom.job_id / "overlay.qcow2").exists()
        assert find_qemus(dest_base, QEMU) == []
        ps = bs.site.vmbatch("ps", "--json")
        (row,) = [r for r in json.loads(ps.stdout) if r["job_id"] == mom.job_id]
        assert (row["state"], row["migrated_to"], row["ssh_port"]) == (
            "migrated",
            dest.uri,
            old_port,
        )

        status = starter.wait(timeout=120)
        stdout, stderr = out.done().decode(), err.done().decode()
        assert status == 5, stderr
        assert stdout.splitlines() == [f"count {i}" for i in range(1, 41)]
        assert "reconnected to the guest" in stderr
        log = agent.read_text()
        assert f"job {mom.job_id}: relay 127.0.0.1:{old_port} -> 127.0.0.1:" in log, log

        epi = mom.epilogue(5)
        ended = True
        assert epi.returncode == 0, epi.stderr.decode()
        with Connection(LibvirtConfig(uri=dest.uri)) as there:
            assert there.status(name) is None
        assert libvirt_conn.status(name) is None
        assert not (dest_base / mom.job_id).exists()
        assert bs.leftovers() == []
        assert _relay_gone(old_port), agent.read_text()
    finally:
        if not ended:
            mom.epilogue(0)
        bs.site.vmbatch("cleanup", mom.job_id)
        dest.stop()
