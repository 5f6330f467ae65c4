"""What every contextualization method gets (ContextSpec) and the protocol it implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vmbatch.contextualize.keys import KeyPair
from vmbatch.libvirt.domain import DiskSpec
from vmbatch.state import JobDir


@dataclass(frozen=True, slots=True)
class ContextSpec:
    """What every method must get into the guest."""

    instance_id: str
    hostname: str
    login_user: str
    authorized_keys: tuple[str, ...]
    host_key: KeyPair


class ContextMethod(Protocol):
    """Turns a ContextSpec into what is attached to the VM."""

    name: str

    def prepare(self, spec: ContextSpec, jobdir: JobDir) -> tuple[DiskSpec, ...]:
        """Write the method's artefacts into ``jobdir``; return disks to attach."""
        ...
