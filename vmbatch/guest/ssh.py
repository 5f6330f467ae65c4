"""SSH to a job's guest: wait until it answers, log in with the pinned key, run a command.

- Readiness: QEMU's user-mode network accepts TCP on the forwarded port at once, before the
  guest listens (docs/platform.md), so we first poll for the ``SSH-`` banner with short timeouts
  and only then start a handshake. Between polls we check that the domain still runs, and
  stop at once if it died, with the end of its serial console in the error.
- Host key: the per-job host key generated on the host is the only key in paramiko's
  known-hosts table for ``[127.0.0.1]:PORT`` and ``RejectPolicy`` refuses anything else, so
  a guest serving another key is refused (never trust-on-first-use).
- Exit status: RFC 4254 section 6.10 sends ``exit-signal`` instead of ``exit-status`` when the
  remote process dies of a signal, and paramiko ignores ``exit-signal``. The command therefore
  runs under the guest's login shell followed by ``exit $?``: that shell stays the parent and
  reports a child killed by signal N as status 128+N, as a batch shell would.
"""

from __future__ import annotations

import base64
import io
import logging
import select
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import paramiko

from vmbatch.contextualize.keys import KeyPair
from vmbatch.errors import (
    GuestBootTimeoutError,
    GuestConnectionError,
    GuestDiedError,
    HostKeyMismatchError,
)
from vmbatch.retry import SSH_CONNECT_POLICY, SSH_READY_POLICY, GuestNotReady

log = logging.getLogger(__name__)

#: What a guest command "returns" when the connection ends without an exit status.
NO_STATUS = 255


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to log in to one guest."""

    port: int
    user: str
    client_key: KeyPair
    host_key: KeyPair
    host: str = "127.0.0.1"
    connect_timeout: float = 10.0
    keepalive_interval: int = 15


def _banner_ready(host: str, port: int, timeout: float) -> bool:
    """True if something on host:port speaks SSH (sends ``SSH-``) within ``timeout``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def wait_for_ssh(
    ep: Endpoint,
    timeout: float,
    is_alive: Callable[[], bool],
    console_tail: Callable[[], str],
) -> paramiko.SSHClient:
    """Wait until the guest answers SSH with the pinned key; return a logged-in client."""
    deadline = time.monotonic() + timeout

    def fail_if_dead() -> None:
        if not is_alive():
            raise GuestDiedError(
                "the VM stopped before its SSH server answered; last console lines:\n"
                + console_tail(),
                hint="check the image's kernel, cmdline and contextualization",
            )

    def poll() -> None:
        fail_if_dead()
        if not _banner_ready(ep.host, ep.port, 0.5):
            raise GuestNotReady(f"no SSH banner on {ep.host}:{ep.port} yet")

    try:
        for attempt in SSH_READY_POLICY.retrying(max_delay=timeout):
            with attempt:
                poll()
    except GuestNotReady as exc:
        fail_if_dead()
        raise GuestBootTimeoutError(
            f"the VM did not answer SSH within {timeout:.0f}s; last console lines:\n"
            + console_tail(),
            hint="raise [vm].boot_timeout if the host is slow, or check the image",
        ) from exc

    remaining = max(deadline - time.monotonic(), ep.connect_timeout)
    for attempt in SSH_CONNECT_POLICY.retrying(max_delay=remaining):
        with attempt:
            fail_if_dead()
            return connect(ep)
    raise AssertionError("unreachable: the retry policy re-raises")  # pragma: no cover


def connect(ep: Endpoint) -> paramiko.SSHClient:
    """One login attempt with the per-job client key, accepting only the pinned host key."""
    client = paramiko.SSHClient()
    known = f"[{ep.host}]:{ep.port}" if ep.port != 22 else ep.host
    client.get_host_keys().add(known, "ssh-ed25519", _public_key(ep.host_key.public_openssh))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pkey = _private_key(ep.client_key.private_openssh)
    try:
        client.connect(
            ep.host,
            port=ep.port,
            username=ep.user,
            pkey=pkey,
            look_for_keys=False,
            allow_agent=False,
            timeout=ep.connect_timeout,
            banner_timeout=ep.connect_timeout,
            auth_timeout=ep.connect_timeout,
            channel_timeout=ep.connect_timeout,
        )
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyMismatchError(
            f"the guest on {ep.host}:{ep.port} served a host key other than the pinned one"
            f" ({exc.key.get_name()} {exc.key.get_base64()[:16]}...)",
            hint="refused for safety: the image's sshd ignores the seed's host key,"
            " or another process owns the port",
        ) from exc
    except (paramiko.SSHException, OSError, EOFError) as exc:
        client.close()
        raise GuestConnectionError(
            f"SSH login to {ep.user}@{ep.host}:{ep.port} failed: {exc}"
        ) from exc
    transport = client.get_transport()
    if transport is not None and ep.keepalive_interval > 0:
        transport.set_keepalive(ep.keepalive_interval)
    return client


def remote_command(argv: Sequence[str]) -> str:
    """The command line sent to the guest: ``argv`` quoted exactly, then ``exit $?`` so the
    login shell reports death by signal N as 128+N (see the module docstring)."""
    return shlex.join(argv) + "\nexit $?"


def run(
    client: paramiko.SSHClient,
    argv: Sequence[str],
    out: BinaryIO,
    err: BinaryIO,
    *,
    timeout: float | None = None,
) -> int:
    """Run ``argv`` in the guest, copy its stdout/stderr live to ``out``/``err``, return status.

    With ``timeout``, a command still running after that many seconds (a hung guest) raises
    GuestConnectionError; the channel is closed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise GuestConnectionError("the SSH connection to the guest is closed")
    chan = transport.open_session()
    try:
        chan.exec_command(remote_command(argv))
        while True:
            progressed = False
            if chan.recv_ready():
                out.write(chan.recv(65536))
                out.flush()
                progressed = True
            if chan.recv_stderr_ready():
                err.write(chan.recv_stderr(65536))
                err.flush()
                progressed = True
            if progressed:
                continue
            if chan.exit_status_ready() or chan.closed or chan.eof_received:
                if not (chan.recv_ready() or chan.recv_stderr_ready()):
                    break
                continue
            if not transport.is_active():
                raise GuestConnectionError("the SSH connection to the guest dropped")
            if deadline is not None and time.monotonic() > deadline:
                raise GuestConnectionError(f"the guest did not finish {argv[0]} in {timeout}s")
            select.select([chan], [], [], 1.0)
        if not chan.exit_status_ready() and not transport.is_active():
            raise GuestConnectionError("the SSH connection to the guest dropped")
        status = chan.recv_exit_status()
    finally:
        chan.close()
    if status < 0:
        log.warning("the guest command ended without an exit status")
        return NO_STATUS
    return status


def _public_key(line: str) -> paramiko.PKey:
    kind, data = line.split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(data))


def _private_key(text: str) -> paramiko.PKey:
    return paramiko.Ed25519Key.from_private_key(io.StringIO(text))
