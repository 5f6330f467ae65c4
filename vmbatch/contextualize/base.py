"""What every contextualization method gets (ContextSpec) and the protocol it implements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmbatch.contextualize.groups import PRIVILEGED
from vmbatch.contextualize.keys import KeyPair
from vmbatch.job import JobUser
from vmbatch.libvirt.domain import DiskSpec
from vmbatch.state import JobDir


@dataclass(frozen=True, slots=True)
class ContextSpec:
    """What every method must get into the guest."""

    instance_id: str
    hostname: str
    #: The job's user (validated in :class:`~vmbatch.job.JobUser`); None: root logs in
    #: (root's ``vmbatch run`` without ``--user``, for debugging images).
    user: JobUser | None
    authorized_keys: tuple[str, ...]
    host_key: KeyPair
    #: The site's cloud-config additions (``[context].site_user_data``), already checked.
    site_user_data: Mapping[str, Any] = field(default_factory=dict)
    #: Keys for root, held by vmbatch only (mounting shared filesystems needs root); empty
    #: unless the site has ``[mounts]``, so no job's guest accepts a root login otherwise.
    admin_keys: tuple[str, ...] = ()
    #: Group names never given to the job's user in the guest (:mod:`.groups`):
    #: the built-in list plus ``[context].privileged_groups``.
    privileged_groups: frozenset[str] = PRIVILEGED

    @property
    def login_user(self) -> str:
        return self.user.name if self.user else "root"


class ContextMethod(Protocol):
    """Turns a ContextSpec into what is attached to the VM or written into its overlay.

    ``prepare`` runs after the job's disks exist (``jobdir.overlay`` is the guest's root
    disk) and before the domain is created; whatever it writes lives in ``jobdir``.
    """

    name: str

    def prepare(self, spec: ContextSpec, jobdir: JobDir) -> tuple[DiskSpec, ...]:
        """Write the method's artefacts into ``jobdir``; return disks to attach."""
        ...
