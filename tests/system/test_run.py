"""`vmbatch run` end to end: real libvirtd, real QEMU guests (TCG), the tiny guest.

One boot per behaviour; every test also gets the leftover check of the `site` fixture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import signal
import socket
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest

from tests.system.conftest import Site, site_domains
from vmbatch import config, lifecycle
from vmbatch.contextualize import ContextSpec, nocloud
from vmbatch.contextualize.keys import generate
from vmbatch.errors import GuestBootTimeoutError, GuestDiedError, HostKeyMismatchError
from vmbatch.job import interactive
from vmbatch.libvirt.connection import Connection


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_streams_status_and_base_image_untouched(site: Site) -> None:
    before = _sha(site.base_image)
    res = site.vmbatch(
        "run",
        "--image",
        "demo",
        "--",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; uname -r;"
        " dd if=/dev/urandom of=/dev/vda bs=64k count=16 2>/dev/null; sync; exit 7",
    )
    assert res.returncode == 7, res.stderr.decode()
    out = res.stdout.decode().splitlines()
    assert out[0] == "to-stdout" and out[1].endswith("-amd64")  # the guest's kernel
    assert b"to-stderr\n" in res.stderr and b"to-stdout" not in res.stderr
    assert _sha(site.base_image) == before


def test_death_by_signal_is_128_plus_n_and_console_log_kept(site: Site) -> None:
    res = site.vmbatch("run", "--image", "demo", "--", "sh", "-c", "kill -9 $$")
    assert res.returncode == 128 + 9, res.stderr.decode()
    logs = list(site.console_dir.glob("*.log"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0


def _wait_for_domain(conn: Connection, site: Site, timeout: float = 60) -> str:
    """The name of this test's domain (another test's may run beside it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doms = sorted(site_domains(conn, site.root))
        if doms:
            return doms[0]
        time.sleep(0.05)
    raise AssertionError("no vmbatch domain appeared")


def _terminate(proc: subprocess.Popen[bytes]) -> bytes:
    """SIGTERM `vmbatch run`; it must exit 128+15 like a shell; return its stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    return err


def test_sigterm_during_boot_leaves_nothing(site: Site, libvirt_conn: Connection) -> None:
    proc = site.popen("run", "--image", "demo", "--", "true")
    try:
        name = _wait_for_domain(libvirt_conn, site)
        ps = site.vmbatch("ps").stdout.decode()  # the job is visible while it boots
        job_id = name.removeprefix("vmbatch-")
        row = next(line for line in ps.splitlines() if line.startswith(f"{job_id} "))
        cells = row.split()  # JOB USER IMAGE STATE PHASE ...
        assert cells[0].startswith("run-") and cells[2] == "demo" and cells[4] == "run"
        err = _terminate(proc)
    finally:
        proc.kill()
    assert b"interrupted by SIGTERM; the VM was destroyed" in err
    assert b"stage command" not in err  # it really was stopped before the command ran


def test_sigterm_during_command_leaves_nothing(site: Site) -> None:
    proc = site.popen("run", "--image", "demo", "--", "sh", "-c", "echo started; sleep 600")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        err = _terminate(proc)
    finally:
        proc.kill()
    assert b"destroyed VM" in err


def test_wrong_host_key_is_refused(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest serves a host key other than the pinned one: no login, nothing left."""
    real = nocloud.user_data

    def other_host_key(spec: ContextSpec) -> str:
        return real(dataclasses.replace(spec, host_key=generate("impostor")))

    monkeypatch.setattr(nocloud, "user_data", other_host_key)
    cfg = config.load(site.config)
    with pytest.raises(HostKeyMismatchError, match="other than the pinned one"):
        lifecycle.run_job(cfg, interactive("demo", ("true",)), _Sink(), _Sink())


def _add_image(site: Site, name: str, cmdline: str) -> None:
    """A catalog entry booting the tiny guest's kernel with another command line."""
    base = site.base_image
    site.write(
        f'\n[images.{name}]\nsource = "{base}"\nkernel = "{base.with_name("vmlinux")}"\n'
        f'initrd = "{base.with_name("initrd.cpio")}"\ncmdline = "{cmdline}"\nmemory = 256\n'
    )


def test_guest_that_never_answers_times_out_with_console(site: Site) -> None:
    _add_image(site, "silent", "console=ttyS0 rdinit=/bin/sleep 3600")
    cfg = config.parse({**_raw(site.config), "vm": {"boot_timeout": 8}})
    with pytest.raises(GuestBootTimeoutError, match="did not answer SSH within 8s") as info:
        lifecycle.run_job(cfg, interactive("silent", ("true",)), _Sink(), _Sink())
    assert "last console lines" in str(info.value)


def test_guest_that_powers_off_during_boot_is_reported_at_once(site: Site) -> None:
    _add_image(site, "off", "console=ttyS0 rdinit=/sbin/poweroff -f")
    cfg = config.load(site.config)
    with pytest.raises(GuestDiedError, match="stopped before its SSH server answered"):
        lifecycle.run_job(cfg, interactive("off", ("true",)), _Sink(), _Sink())


@pytest.mark.parametrize("outbound", [False, True], ids=["restricted", "outbound"])
def test_outbound_network_switch(site: Site, outbound: bool) -> None:
    """With outbound_network = false the guest cannot even reach the host's loopback
    (10.0.2.2 is the host's 127.0.0.1 on QEMU's user network); with true it can."""
    connections: list[object] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def accept() -> None:  # close at once, so the guest's nc ends
            with contextlib.suppress(OSError):
                conn, peer = listener.accept()
                connections.append(peer)
                conn.close()

        threading.Thread(target=accept, daemon=True).start()
        raw = _raw(site.config)
        vm = {**raw["vm"], "outbound_network": outbound}  # type: ignore[dict-item]
        cfg = config.parse({**raw, "vm": vm})
        out = _Sink()
        cmd = f"nc -w 3 10.0.2.2 {port} </dev/null; echo nc=$?"
        assert lifecycle.run_job(cfg, interactive("demo", ("sh", "-c", cmd)), out, _Sink()) == 0
    assert bool(connections) is outbound, out.data
    assert (b"nc=0" in out.data) is outbound, out.data


def test_doctor_reports_the_accelerator(site: Site) -> None:
    res = site.vmbatch("doctor")
    out = res.stdout.decode()
    # No node agent runs for this site (tests/system/test_suspend.py starts one): the one
    # warning, and doctor's exit status says something is not ok.
    warned = [line for line in out.splitlines() if not line.startswith(("ok ", "     "))]
    assert warned == [
        "WARN node agent: vmbatch agent is not running: a job the scheduler suspends keeps its"
        " VM running"
    ], out
    assert res.returncode == 69
    assert "ok   libvirtd: libvirt 9." in out
    assert "ok   accelerator: TCG: auto:" in out or "ok   accelerator: KVM: auto:" in out
    assert "ok   image demo:" in out


class _Sink:
    """A binary stream that keeps what it is given (for in-process runs)."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, b: bytes) -> int:
        self.data += b
        return len(b)

    def flush(self) -> None:
        pass


def _raw(path: Path) -> dict[str, object]:
    return tomllib.loads(path.read_text())
