"""``vmbatch migrate JOB`` (vmbatch/migrate.py :func:`migrate_job`) through click's test
runner: what it refuses before anything changes; the ``migration`` pause reason (the
starter's note only, never the domain); the agent's relays kept as records say; the
teardown of a migrated job at its destination. Real VMs and a real relay:
tests/system/test_migrate.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.unit.test_ops import TORQUE_ID, Site, domain_xml
from vmbatch import config, pausing, relay
from vmbatch.hooks import batch
from vmbatch.hooks.jobstate import KEPT, READY, Record, StateStore, UserDir
from vmbatch.libvirt import connection
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name
from vmbatch.state import JobDir


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path, [domain_xml(TORQUE_ID, "alice", tmp_path / "jobs")])


def test_migrate_refuses_what_is_not_a_running_batch_job(site: Site) -> None:
    code, _, err = site.vmbatch("migrate", "4711", "--to", "qemu:///other")
    assert code == 65 and "no batch job 4711 on this node" in err
    site.record("4712", domain=domain_name("4712"), phase=KEPT)
    code, _, err = site.vmbatch("migrate", "4712", "--to", "qemu:///other")
    assert code == 65 and "job 4712 is kept, not running: only a running job's VM" in err
    code, _, err = site.vmbatch("migrate", "../x", "--to", "qemu:///other")
    assert code == 65 and "has characters vmbatch does not accept" in err


def test_migrate_needs_a_destination_and_an_absolute_directory(site: Site) -> None:
    code, _, err = site.vmbatch("migrate", "42")
    assert code == 2 and "Missing option '--to'" in err
    code, _, err = site.vmbatch("migrate", "42", "--to", "qemu:///x", "--dest-dir", "rel")
    assert code == 2 and "--dest-dir" in err and "must be an absolute path" in err


def test_migrate_is_roots(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "geteuid", lambda: 4711)
    code, _, err = site.vmbatch("migrate", "42", "--to", "qemu:///x")
    assert code == 65 and "only root may migrate a job's VM" in err


def _unchanged(site: Site, before: Record) -> None:
    assert StateStore(site.state_dir).read(before.job_id) == before
    assert UserDir(site.user_dir, before.job_id).read_paused() == (False, 0)


def test_migrate_refuses_without_an_agent_to_relay(site: Site) -> None:
    rec = site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY)
    code, _, err = site.vmbatch("migrate", TORQUE_ID, "--to", "qemu:///other")
    assert code == 75, err
    assert "no `vmbatch agent` runs on this node" in err and "systemctl start" in err
    _unchanged(site, rec)


def test_migrate_refuses_a_migrated_or_paused_job_and_its_own_libvirtd(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmbatch import agent

    monkeypatch.setattr(agent, "running", lambda cfg: 4242)
    name = domain_name(TORQUE_ID)
    rec = site.record(TORQUE_ID, domain=name, phase=READY, migrated_to="qemu+ssh://n2/system")
    code, _, err = site.vmbatch("migrate", TORQUE_ID, "--to", "qemu:///other")
    assert code == 75 and "its VM runs at qemu+ssh://n2/system already" in err
    _unchanged(site, rec)
    rec = site.record(TORQUE_ID, domain=name, phase=READY, pauses=("operator",))
    code, _, err = site.vmbatch("migrate", TORQUE_ID, "--to", "qemu:///other")
    assert code == 75 and "is paused (operator); migrate it once it runs" in err
    rec = site.record(TORQUE_ID, domain=name, phase=READY)
    uri = config.load(site.config).libvirt.uri
    code, _, err = site.vmbatch("migrate", TORQUE_ID, "--to", uri)
    assert code == 75 and "is this node's" in err
    # On this host, the destination may not take the job's own directory.
    code, _, err = site.vmbatch("migrate", TORQUE_ID, "--to", "qemu:///other")
    assert code == 75 and "its own --dest-dir" in err
    _unchanged(site, rec)


def test_a_failed_migration_takes_its_pause_back(
    site: Site, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The test driver has no migration: libvirt refuses, the VM runs on, the note and
    the record say it runs as before."""
    from vmbatch import agent, migrate

    monkeypatch.setattr(agent, "running", lambda cfg: 4242)
    monkeypatch.setattr(connection.Connection, "ssh_port", lambda self, name, port: 40022)
    seen: list[tuple[bool, int]] = []

    def fake(*args: object, **kw: object) -> None:
        seen.append(UserDir(site.user_dir, TORQUE_ID).read_paused())
        raise migrate.MigrationError("libvirt said no")

    monkeypatch.setattr(migrate, "migrate", fake)
    rec = site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY)
    code, _, err = site.vmbatch(
        "migrate", TORQUE_ID, "--to", "qemu:///other", "--dest-dir", str(tmp_path / "there")
    )
    assert code == 75 and "libvirt said no" in err
    assert seen == [(True, 1)]  # the starter waited while it was tried
    after = StateStore(site.state_dir).read(TORQUE_ID)
    assert after == rec
    assert UserDir(site.user_dir, TORQUE_ID).read_paused() == (False, 1)


def test_the_migration_reason_pauses_the_starter_not_the_domain(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(connection.Connection, "suspend", lambda self, n: calls.append("s"))
    monkeypatch.setattr(connection.Connection, "resume", lambda self, n: calls.append("r"))
    monkeypatch.setattr(connection.Connection, "set_guest_time", lambda self, n: None)
    cfg = config.load(site.config)
    store = StateStore(site.state_dir)
    note = UserDir(site.user_dir, TORQUE_ID)
    rec = site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY)
    with Connection(cfg.libvirt) as conn:
        rec = pausing.add(cfg, store, conn, rec, pausing.MIGRATION)
        assert (calls, rec.pauses, rec.paused_at) == ([], ("migration",), None)
        assert note.read_paused() == (True, 1)
        # An operator's pause meanwhile does pause the VM; the migration's end leaves it.
        rec = pausing.add(cfg, store, conn, rec, pausing.OPERATOR)
        assert calls == ["s"] and rec.paused_at is not None
        rec = pausing.drop(cfg, store, conn, rec, pausing.MIGRATION)
        assert calls == ["s"] and rec.pauses == ("operator",)
        assert note.read_paused() == (True, 1)
        rec = pausing.drop(cfg, store, conn, rec, pausing.OPERATOR)
        assert calls == ["s", "r"] and rec.pauses == ()
        assert note.read_paused() == (False, 1)
        # The other way round: the operator's pause goes first, the VM runs, the
        # starter still waits for the migration.
        rec = pausing.add(cfg, store, conn, rec, pausing.MIGRATION)
        rec = pausing.add(cfg, store, conn, rec, pausing.OPERATOR)
        rec = pausing.drop(cfg, store, conn, rec, pausing.OPERATOR)
        assert calls == ["s", "r", "s", "r"] and rec.pauses == ("migration",)
        assert note.read_paused() == (True, 2)
        assert not pausing.vm_paused(rec.pauses)


def test_relays_follow_the_records(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    stopped: list[int] = []
    fail = {7}

    def start(self: relay.Relay) -> None:
        if self.spec.port in fail:
            raise OSError("Address already in use")
        started.append(self.spec.port)

    monkeypatch.setattr(relay.Relay, "start", start)
    monkeypatch.setattr(relay.Relay, "stop", lambda self: stopped.append(self.spec.port))

    def rec(job: str, port: int, phase: str = READY, to: str = "127.0.0.1:9") -> Record:
        return Record(job_id=job, scheduler="slurm", user="u", phase=phase, relay_port=port,
                      relay_to=to)  # fmt: skip

    relays = relay.Relays()
    relays.sync([rec("1", 5), rec("2", 0), rec("3", 6, KEPT), rec("4", 7)])
    assert started == [5] and sorted(relays.running) == ["1"]
    fail.clear()  # the port is free now: tried again
    relays.sync([rec("1", 5), rec("4", 7)])
    assert started == [5, 7] and stopped == []
    relays.sync([rec("1", 5, to="127.0.0.1:10")])  # another target: a new relay
    assert stopped == [5, 7] and started == [5, 7, 5]
    relays.sync([])
    assert stopped == [5, 7, 5] and relays.running == {}


def test_relay_spec_targets_and_listening_sockets(tmp_path: Path) -> None:
    spec = relay.RelaySpec("1", 5, "[::1]:2222")
    assert spec.target == ("::1", 2222)
    assert relay.RelaySpec("1", 5, "node2:22").target == ("node2", 22)
    tcp = tmp_path / "tcp"
    tcp.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000\n"
        "   1: 0100007F:0016 0100007F:D431 01 00000000:00000000\n"
        "   2: 00000000:0017 00000000:0000 0A 00000000:00000000\n"
    )
    assert relay.listening(8080, tcp)
    assert not relay.listening(22, tcp)  # connected, not listening
    assert not relay.listening(23, tcp)  # not on 127.0.0.1
    assert not relay.listening(8080, tmp_path / "none")


def test_cleanup_tears_a_migrated_job_down_at_its_destination(site: Site, tmp_path: Path) -> None:
    """The destination is a second test-driver node holding the domain; the job's files
    there go, and so does the record."""
    there = tmp_path / "there"
    dest_node = tmp_path / "dest.xml"
    dest_node.write_text("<node>" + domain_xml(TORQUE_ID, "alice", there) + "</node>")
    dest_dir = JobDir(there, TORQUE_ID)
    dest_dir.path.mkdir(parents=True)
    (dest_dir.path / "overlay.qcow2").write_bytes(b"disk")
    # No domain at the source any more: the node file of the site has none.
    (tmp_path / "node.xml").write_text(
        (tmp_path / "node.xml").read_text().split("<domain")[0] + "</node>"
    )
    site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY,
                migrated_to=f"test://{dest_node}", migrated_dir=str(dest_dir.path),
                relay_port=40022, relay_to="127.0.0.1:41000", started=time.time())  # fmt: skip
    code, out, err = site.vmbatch("-v", "cleanup", TORQUE_ID)
    assert code == 0, err
    assert f"job {TORQUE_ID}: cleaned up" in out
    assert f"destroyed VM {domain_name(TORQUE_ID)}" in err
    assert f"at test://{dest_node} is gone" in err
    assert not dest_dir.path.exists()
    assert StateStore(site.state_dir).read(TORQUE_ID) is None


def test_a_migrated_dir_that_is_not_the_jobs_is_never_removed(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is root's; still, only a directory named after the job goes."""
    other = tmp_path / "precious"
    other.mkdir()
    destroyed: list[str] = []
    monkeypatch.setattr(connection.Connection, "destroy", lambda self, n: destroyed.append(n))
    rec = Record(job_id=TORQUE_ID, scheduler="torque", user="alice", phase=READY,
                 domain=domain_name(TORQUE_ID), migrated_to="test:///default",
                 migrated_dir=str(other))  # fmt: skip
    batch._teardown_migrated(config.load(site.config), rec, rec.domain)
    assert other.is_dir() and destroyed


def test_ps_shows_a_migrated_job_with_where_it_runs_and_its_relay_port(site: Site) -> None:
    site.record("77", domain=domain_name("77"), phase=READY, started=1.0,
                migrated_to="qemu+ssh://n2/system", relay_port=40022,
                relay_to="127.0.0.1:41000")  # fmt: skip
    code, out, err = site.vmbatch("ps", "--json")
    assert code == 0, err
    (row,) = [r for r in json.loads(out) if r["job_id"] == "77"]
    assert row["state"] == "migrated" and row["domain"] == domain_name("77")
    assert row["migrated_to"] == "qemu+ssh://n2/system" and row["ssh_port"] == 40022
    code, out, _ = site.vmbatch("ps")
    assert code == 0
    (line,) = [li for li in out.splitlines() if li.startswith("77 ")]
    assert "migrated" in line.split() and "40022" in line.split()


def test_suspend_and_resume_reach_a_migrated_vm_where_it_runs(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(
        connection.Connection, "suspend", lambda self, n: calls.append(("s", self.cfg.uri))
    )
    monkeypatch.setattr(
        connection.Connection, "resume", lambda self, n: calls.append(("r", self.cfg.uri))
    )
    monkeypatch.setattr(connection.Connection, "set_guest_time", lambda self, n: None)
    site.record(TORQUE_ID, domain=domain_name(TORQUE_ID), phase=READY,
                migrated_to="test:///default")  # fmt: skip
    assert site.vmbatch("suspend", TORQUE_ID)[0] == 0
    assert site.vmbatch("resume", TORQUE_ID)[0] == 0
    assert calls == [("s", "test:///default"), ("r", "test:///default")]
