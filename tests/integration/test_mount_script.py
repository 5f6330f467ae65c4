"""The guest's mount script, run by a real shell: a guest without mount.nfs is named."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from vmbatch import config
from vmbatch.guest.mounts import mount_script


def test_missing_mount_helper_exits_127(tmp_path: Path) -> None:
    raw = {"source": "nfs://127.0.0.1/export", "path": str(tmp_path / "mnt")}
    mount = config.parse({"mounts": {"m": raw}}).mounts["m"]
    res = subprocess.run(
        ["/bin/sh", "-c", mount_script(mount, "10.0.2.2", 5)],
        env={"PATH": str(tmp_path)},  # no mount.nfs, no mkdir: the check comes first
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert res.returncode == 127 and "mount.nfs not found" in res.stderr
    assert not (tmp_path / "mnt").exists()


def test_doctor_says_whether_the_nfs_server_answers() -> None:
    from vmbatch.doctor import _mount

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        raw = {"source": f"nfs://127.0.0.1:{port}/export", "path": "/data"}
        mount = config.parse({"mounts": {"data": raw}}).mounts["data"]
        up = _mount(mount)
    down = _mount(mount)  # the listener is closed now
    assert up.ok and "server answers" in up.detail
    assert not down.ok and f"127.0.0.1:{port} not reachable" in down.detail
    assert "[mounts.data].source" in down.fix
