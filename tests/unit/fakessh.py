"""A fake paramiko client for the guest session: no sockets, no SSH, no guest.

A :class:`FakeGuest` hands out one :class:`FakeClient` per login. How logins and exec
channels behave is set on the guest:

``login``: ``"ok"``; ``"closed"`` (the login returns a client whose transport has already
closed: the guest crashed right after it); ``"refused"`` (GuestConnectionError).

``exec``: ``"ok"`` (status 0); ``"drop"`` (the connection ends without a status);
``"hang"`` (nothing comes back until something closes the transport, as with a hung guest:
paramiko's reads, ``exec_command`` and ``recv_exit_status`` then wait forever).

Every call that touches the fake counts; past :data:`CALL_LIMIT` it raises
:class:`SpinError`, so code that would loop forever fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
from typing import Literal

from vmbatch.errors import GuestConnectionError

#: Far more calls than any bounded reconnect loop in these tests makes.
CALL_LIMIT = 5000
#: Seconds a hung command waits for its transport to be closed before the test fails. Only
#: reached when nothing bounds the command; never asserted as a speed.
HANG_LIMIT = 10.0


class SpinError(AssertionError):
    """The code under test kept going where it should have stopped."""


class FakeGuest:
    def __init__(
        self,
        login: Literal["ok", "closed", "refused"] = "ok",
        exec_: Literal["ok", "drop", "hang"] = "ok",
    ) -> None:
        self.login = login
        self.exec = exec_
        self.logins = 0
        self.calls = 0
        self.commands: list[str] = []
        self.transports: list[FakeTransport] = []

    def tick(self) -> None:
        self.calls += 1
        if self.calls > CALL_LIMIT:
            raise SpinError(f"{self.calls} calls on the fake SSH client: a loop without end")

    def connect(self) -> FakeClient:
        """One login (``ssh.connect``)."""
        self.tick()
        self.logins += 1
        if self.login == "refused":
            raise GuestConnectionError("SSH login to the fake guest failed: refused")
        transport = FakeTransport(self)
        if self.login == "closed":
            transport.close()
        self.transports.append(transport)
        return FakeClient(self, transport)


class FakeTransport:
    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest
        self.closed = threading.Event()

    def is_active(self) -> bool:
        return not self.closed.is_set()

    def close(self) -> None:
        self.closed.set()

    def open_session(self, timeout: float | None = None) -> FakeChannel:
        self.guest.tick()
        if not self.is_active():
            raise EOFError("the fake transport is closed")
        return FakeChannel(self)


class FakeChannel:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport
        self.guest = transport.guest

    def exec_command(self, command: str) -> None:
        self.guest.commands.append(command)

    def sendall(self, data: bytes) -> None:
        pass

    def shutdown_write(self) -> None:
        pass

    def makefile(self, mode: str) -> _Output:
        return _Output(self)

    def makefile_stderr(self, mode: str) -> _Output:
        return _Output(self)

    def recv_exit_status(self) -> int:
        if self.guest.exec == "ok" and self.transport.is_active():
            return 0
        return -1  # what paramiko returns when the channel closed without a status

    def close(self) -> None:
        pass


class _Output:
    def __init__(self, chan: FakeChannel) -> None:
        self.chan = chan

    def read(self) -> bytes:
        transport = self.chan.transport
        if self.chan.guest.exec == "drop":
            transport.close()
        elif self.chan.guest.exec == "hang" and not transport.closed.wait(HANG_LIMIT):
            raise SpinError("a command in a hung guest was never cut off")
        return b""


class FakeClient:
    def __init__(self, guest: FakeGuest, transport: FakeTransport) -> None:
        self.guest = guest
        self.transport = transport

    def get_transport(self) -> FakeTransport:
        self.guest.tick()
        return self.transport

    def close(self) -> None:
        self.transport.close()
