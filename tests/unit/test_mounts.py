"""The mount commands vmbatch sends to the guest, and how NFS servers are addressed."""

from __future__ import annotations

import pytest

from vmbatch import config
from vmbatch.errors import Disposition, MountError
from vmbatch.guest.mounts import USER_NET_GATEWAY, NfsSource, mount_options, mount_script


def _mount(**kw: object) -> config.MountConfig:
    raw = {"source": "nfs://127.0.0.1:20490/export/a", "path": "/srv/a", **kw}
    return config.parse({"mounts": {"m": raw}}).mounts["m"]


def test_source_and_options() -> None:
    src = NfsSource.parse("nfs://127.0.0.1:20490/export/a")
    assert (src.host, src.port, src.export) == ("127.0.0.1", 20490, "/export/a")
    assert NfsSource.parse("nfs://server/x").port == 2049
    assert mount_options(_mount(options="vers=4.2,hard"), src) == "retry=0,port=20490,vers=4.2,hard"
    assert mount_options(_mount(), NfsSource.parse("nfs://s/x")) == "retry=0"


def test_loopback_servers_are_reached_at_the_user_mode_gateway() -> None:
    assert NfsSource.parse("nfs://127.0.0.1/x").guest_address() == USER_NET_GATEWAY
    assert NfsSource.parse("nfs://localhost/x").guest_address() == USER_NET_GATEWAY
    assert NfsSource.parse("nfs://192.0.2.7/x").guest_address() == "192.0.2.7"


def test_unresolvable_server_is_a_retried_node_problem() -> None:
    with pytest.raises(MountError) as exc:
        NfsSource.parse("nfs://no-such-host.invalid/x").guest_address()
    assert exc.value.transient and exc.value.disposition is Disposition.REQUEUE
    assert "'no-such-host.invalid'" in str(exc.value)


def test_mount_script_is_one_quoted_attempt() -> None:
    script = mount_script(_mount(options="hard"), "10.0.2.2", 12.7)
    assert "timeout -s KILL 12 mount -t nfs -o retry=0,port=20490,hard" in script
    assert "10.0.2.2:/export/a /srv/a" in script
