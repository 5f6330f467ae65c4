"""The libvirt wrapper against libvirt's test driver (no daemon)."""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import pytest

from vmbatch.config import LibvirtConfig
from vmbatch.errors import (
    DomainDefinitionError,
    LibvirtError,
    LibvirtTimeoutError,
    LibvirtUnavailableError,
)
from vmbatch.libvirt.connection import Connection, DomainNotFound, map_error
from vmbatch.libvirt.domain import DiskSpec, DomainSpec, JobMetadata, build_xml


def _xml(name: str, job: str) -> str:
    return build_xml(
        DomainSpec(
            name=name,
            domain_type="qemu",
            memory_mib=128,
            vcpus=1,
            machine="q35",
            disks=(DiskSpec(Path("/x/overlay.qcow2"), "qcow2"),),
            console_log=Path("/x/console.log"),
            metadata=JobMetadata(job, "alice", "none", "demo", "0.1.0"),
            emulator=Path("/usr/bin/qemu-system-x86_64"),
        )
    )


def test_create_list_destroy_is_idempotent(test_uri: str) -> None:
    with Connection(LibvirtConfig(uri=test_uri)) as conn:
        conn.create("vmbatch-7", _xml("vmbatch-7", "7"))
        assert conn.is_running("vmbatch-7")
        [info] = [d for d in conn.list_vmbatch() if d.name == "vmbatch-7"]
        assert info.metadata is not None and info.metadata.job_id == "7"
        assert conn.destroy("vmbatch-7") is True
        assert conn.destroy("vmbatch-7") is False  # already gone counts as done
        assert not conn.is_running("vmbatch-7")


def test_other_domains_are_not_listed(test_uri: str) -> None:
    with Connection(LibvirtConfig(uri=test_uri)) as conn:
        conn.create("someone-else", _xml("someone-else", "1"))
        assert all(d.name != "someone-else" for d in conn.list_vmbatch())


def test_invalid_xml_maps_to_definition_error(test_uri: str) -> None:
    with Connection(LibvirtConfig(uri=test_uri)) as conn, pytest.raises(LibvirtError) as info:
        conn.create("x", "<domain type='qemu'><name>x</name><memory>nope</memory></domain>")
    assert "libvirt could not start domain x" in str(info.value)


def test_unreachable_libvirtd_is_a_clear_requeue_error() -> None:
    uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    cfg = LibvirtConfig(uri=uri, timeout=5)
    with pytest.raises(LibvirtUnavailableError) as info:
        Connection(cfg).open()
    assert "is libvirtd running?" in str(info.value)


def test_hung_call_is_bounded(test_uri: str) -> None:
    conn = Connection(LibvirtConfig(uri=test_uri, timeout=0.2))
    start = time.monotonic()
    with pytest.raises(LibvirtTimeoutError, match="did not hang around within 0s"):
        conn._bounded("hang around", time.sleep, 5)
    assert time.monotonic() - start < 4  # did not wait for the stuck call


def test_errors_map_by_named_code() -> None:
    def err(code: int, domain: int = libvirt.VIR_FROM_QEMU) -> libvirt.libvirtError:
        e = libvirt.libvirtError("boom")
        e.err = (code, domain, "boom", 2, None, None, None, 0, 0)
        return e

    assert isinstance(map_error(err(libvirt.VIR_ERR_NO_DOMAIN), "x"), DomainNotFound)
    assert isinstance(map_error(err(libvirt.VIR_ERR_XML_ERROR), "x"), DomainDefinitionError)
    assert isinstance(map_error(err(libvirt.VIR_ERR_OPERATION_TIMEOUT), "x"), LibvirtTimeoutError)
    assert isinstance(
        map_error(err(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC), "x"),
        LibvirtUnavailableError,
    )
    plain = map_error(err(libvirt.VIR_ERR_INTERNAL_ERROR), "start it")
    assert type(plain) is LibvirtError and str(plain) == "libvirt could not start it: boom"


def test_destroy_waits_for_a_create_that_timed_out(test_uri: str) -> None:
    """A createXML that outlives our timeout may still start the VM: destroy must see it."""
    with Connection(LibvirtConfig(uri=test_uri, timeout=2.0)) as conn:
        real = conn._conn
        slow = type(
            "Slow",
            (),
            {
                "createXML": lambda self, xml, flags: (time.sleep(3.0), real.createXML(xml, flags))[
                    1
                ]
            },
        )()
        conn._conn = slow
        with pytest.raises(LibvirtTimeoutError):
            conn.create("vmbatch-slow", _xml("vmbatch-slow", "9"))
        conn._conn = real
        assert conn.destroy("vmbatch-slow") is True
        assert not conn.is_running("vmbatch-slow")


def test_a_busy_host_is_asked_again_and_other_refusals_are_final(
    test_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VIR_ERR_RESOURCE_BUSY is retried through LibvirtCreatePolicy, with its log line."""
    import tenacity

    monkeypatch.setattr(tenacity.nap, "sleep", lambda s: None)

    def err(code: int) -> libvirt.libvirtError:
        e = libvirt.libvirtError("busy")
        e.err = (code, libvirt.VIR_FROM_QEMU, "busy", 2, None, None, None, 0, 0)
        return e

    with Connection(LibvirtConfig(uri=test_uri)) as conn:
        real = conn._conn
        calls: list[str] = []

        class Busy:
            def createXML(self, xml: str, flags: int) -> object:  # noqa: N802 - libvirt's name
                calls.append("create")
                if len(calls) < 3:
                    raise err(libvirt.VIR_ERR_RESOURCE_BUSY)
                return real.createXML(xml, flags)

        conn._conn = Busy()
        conn.create("vmbatch-busy", _xml("vmbatch-busy", "8"))
        conn._conn = real
        assert calls == ["create"] * 3 and conn.is_running("vmbatch-busy")

        class Refuses:
            def createXML(self, xml: str, flags: int) -> object:  # noqa: N802
                calls.append("refused")
                raise err(libvirt.VIR_ERR_INTERNAL_ERROR)

        conn._conn = Refuses()
        with pytest.raises(LibvirtError, match="libvirt could not start domain vmbatch-no"):
            conn.create("vmbatch-no", _xml("vmbatch-no", "7"))
        conn._conn = real
        assert calls.count("refused") == 1
