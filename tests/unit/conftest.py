"""Unit tests: no daemon, no network, no subprocess.

The autouse fixture makes any attempt to start a process fail loudly, so a unit test can never
call qemu-img or virsh by accident (cloud-init's unit tests do the same).
"""

from __future__ import annotations

import subprocess
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
