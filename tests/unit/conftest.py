"""Unit tests: no daemon, no network, no subprocess.

The autouse fixture makes any attempt to start a process fail loudly, so a unit test can never
call qemu-img or virsh by accident (cloud-init's unit tests do the same).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unit tests must not start processes: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.fixture
def test_uri() -> str:
    """A libvirt test-driver URI with fresh state for every connection."""
    return "test://" + str((DATA / "node.xml").resolve())


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` for code that waits: tenacity's deadlines read
    the one and its waits call the other. A sleep is recorded and advances the clock at once,
    so a test counts waits and reaches deadlines without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "monotonic", fake.monotonic)
    monkeypatch.setattr(time, "sleep", fake.sleep)
    return fake
