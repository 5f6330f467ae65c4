"""The loopback relay of a migrated job: its starter's old SSH endpoint, forwarded.

A job's starter (the job's user) reaches its VM's SSH server through QEMU's ``hostfwd`` on
``127.0.0.1:PORT`` of the node, the port written to ``guest.json`` by the prologue. After
``vmbatch migrate`` (:mod:`vmbatch.migrate`) the source's QEMU is gone, its port free, and
the VM answers on a new forward at the destination. The starter keeps its endpoint: root's
relay on this node binds the same ``127.0.0.1:PORT`` and forwards every connection to the
destination's forward (:attr:`Record.relay_to`). The starter still checks the guest's
pinned host key, so whoever answers on the port cannot pass for the guest.

The relay must outlive ``vmbatch migrate``: ``vmbatch agent`` runs one per migrated job
whose record is ``ready`` (:meth:`Relays.sync`, called from the agent's loop) and stops it
when the record is gone or no longer ready (the epilogue ran), closing its connections.

Where the destination's forward is only reachable inside a network namespace (a libvirtd
in its own namespace on this host, as the system tests run one), the record names that
namespace (a path such as ``/proc/PID/ns/net`` of the destination's QEMU, with its inode,
checked when the relay opens it). Each connection to the destination is made by a
short-lived thread that entered it: ``setns(2)`` with ``CLONE_NEWNET`` changes only the
calling thread, and a socket stays in the namespace it was made in
(https://man7.org/linux/man-pages/man2/setns.2.html).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from vmbatch.hooks.jobstate import READY, Record

log = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
#: Seconds a connection to the destination may take.
CONNECT_TIMEOUT = 10.0
_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class RelaySpec:
    """What a record asks for: listen on 127.0.0.1:``port``, forward to ``to`` from
    inside the network namespace ``netns`` ("": this process's) of inode ``netns_ino``."""

    job_id: str
    port: int
    to: str
    netns: str = ""
    netns_ino: int = 0

    @classmethod
    def of(cls, record: Record) -> RelaySpec | None:
        if record.phase != READY or not record.relay_port or not record.relay_to:
            return None
        return cls(
            record.job_id,
            record.relay_port,
            record.relay_to,
            record.relay_netns,
            record.relay_netns_ino,
        )

    @property
    def target(self) -> tuple[str, int]:
        host, _, port = self.to.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass
class Relay:
    """One running relay (:meth:`start` binds, or raises OSError)."""

    spec: RelaySpec
    connections: int = 0
    _listener: socket.socket | None = None
    _netns_fd: int = -1
    _stop: threading.Event = field(default_factory=threading.Event)
    _socks: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        spec = self.spec
        if spec.netns:
            fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(fd).st_ino != spec.netns_ino:
                os.close(fd)
                raise OSError(f"{spec.netns} is no longer the destination's network namespace")
            self._netns_fd = fd
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", spec.port))
            listener.listen(16)
            listener.settimeout(0.2)
        except OSError:
            self._close_ns()
            raise
        self._listener = listener
        self._thread = threading.Thread(
            target=self._accept, args=(listener,), name=f"relay-{spec.job_id}", daemon=True
        )
        self._thread.start()
        log.info("job %s: relay 127.0.0.1:%d -> %s started", spec.job_id, spec.port, spec.to)

    def _close_ns(self) -> None:
        if self._netns_fd >= 0:
            os.close(self._netns_fd)
            self._netns_fd = -1

    def _connect(self) -> socket.socket:
        if self._netns_fd < 0:
            return socket.create_connection(self.spec.target, timeout=CONNECT_TIMEOUT)
        box: list[socket.socket | OSError] = []

        def inside() -> None:
            try:
                _setns(self._netns_fd)
                box.append(socket.create_connection(self.spec.target, timeout=CONNECT_TIMEOUT))
            except OSError as exc:
                box.append(exc)

        # A thread of its own: it stays in the destination's namespace until it ends.
        t = threading.Thread(target=inside, name=f"relay-{self.spec.job_id}-connect")
        t.start()
        t.join(CONNECT_TIMEOUT + 5)
        if not box:
            raise OSError(f"no connection to {self.spec.to} within {CONNECT_TIMEOUT:.0f}s")
        got = box[0]
        if isinstance(got, OSError):
            raise got
        return got

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = self._connect()
            except OSError as exc:
                log.warning(
                    "job %s: relay cannot reach %s: %s", self.spec.job_id, self.spec.to, exc
                )
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._stop.is_set():
                    client.close()
                    upstream.close()
                    return
                self.connections += 1
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(_CHUNK):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """Stop listening and close every connection (the job is over)."""
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._socks.clear()
        self._close_ns()
        log.info("job %s: relay on 127.0.0.1:%d stopped", self.spec.job_id, self.spec.port)


@dataclass
class Relays:
    """The relays of this node's migrated jobs, kept as their records say."""

    running: dict[str, Relay] = field(default_factory=dict)
    #: Why a relay could not start, per job: logged once, not on every call.
    _failed: dict[str, str] = field(default_factory=dict)

    def sync(self, records: list[Record]) -> None:
        """Start a relay for each ready record that asks for one, stop those no record
        asks for any more (or asks for another). A relay that cannot bind or open its
        namespace is logged and tried again on the next call."""
        wanted = {s.job_id: s for r in records if (s := RelaySpec.of(r)) is not None}
        for job_id, relay in list(self.running.items()):
            if wanted.get(job_id) != relay.spec:
                relay.stop()
                del self.running[job_id]
        for job_id, spec in wanted.items():
            if job_id in self.running:
                continue
            relay = Relay(spec)
            try:
                relay.start()
            except OSError as exc:
                if self._failed.get(job_id) != str(exc):
                    self._failed[job_id] = str(exc)
                    log.warning(
                        "job %s: relay on 127.0.0.1:%d not started (%s); trying again",
                        job_id,
                        spec.port,
                        exc,
                    )
                continue
            self._failed.pop(job_id, None)
            self.running[job_id] = relay
        for job_id in set(self._failed) - set(wanted):
            del self._failed[job_id]

    def stop(self) -> None:
        for relay in self.running.values():
            relay.stop()
        self.running.clear()


def listening(port: int, tcp: Path = Path("/proc/net/tcp")) -> bool:
    """Whether a socket of this network namespace listens on 127.0.0.1:``port``
    (``/proc/net/tcp``: local address ``0100007F:PPPP`` in hex, state ``0A`` = LISTEN;
    proc(5))."""
    want = f"0100007F:{port:04X}"
    try:
        lines = tcp.read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == want and fields[3] == "0A":
            return True
    return False


__all__ = ["Relay", "RelaySpec", "Relays", "listening"]
