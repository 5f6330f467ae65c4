"""JobSpec: what one job asks for. The hooks issue adds parsing from Torque and Slurm."""

from __future__ import annotations

import getpass
import uuid
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JobSpec:
    """An immutable description of one job's request."""

    job_id: str
    user: str
    image: str
    argv: tuple[str, ...]
    scheduler: str = "none"
    memory: int | None = None
    vcpus: int | None = None
    #: ``vmbatch run`` by root may name a local image file instead of a catalog entry.
    allow_image_path: bool = False


def interactive(
    image: str,
    argv: tuple[str, ...],
    *,
    memory: int | None = None,
    vcpus: int | None = None,
    allow_image_path: bool = False,
) -> JobSpec:
    """A JobSpec for ``vmbatch run`` from a shell: a fresh id, the calling user."""
    return JobSpec(
        job_id=f"run-{uuid.uuid4().hex[:12]}",
        user=getpass.getuser(),
        image=image,
        argv=argv,
        memory=memory,
        vcpus=vcpus,
        allow_image_path=allow_image_path,
    )
