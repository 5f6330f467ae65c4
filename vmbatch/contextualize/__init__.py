"""Contextualization: how the per-job identity and keys get into the guest.

Each method is a class behind the small :class:`ContextMethod` protocol, listed in
:data:`REGISTRY`; the catalog chooses one per image. This issue ships NoCloud only; the
contextualization issue adds CernVM/HEPiX and offline injection.
"""

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


def get_method(name: str) -> ContextMethod:
    from vmbatch.contextualize.nocloud import NoCloud

    registry: dict[str, type[ContextMethod]] = {"nocloud": NoCloud}
    return registry[name]()


#: Names of every contextualization method (a unit test instantiates each).
REGISTRY_NAMES = ("nocloud",)
