"""Contextualization: how the per-job identity and keys get into the guest.

Each method is a class behind the small :class:`ContextMethod` protocol, listed in
:data:`REGISTRY` (explicit, so grep and mypy see every one; a unit test instantiates each);
the catalog chooses one per image (``[images.NAME].context``):

- ``nocloud``: a cloud-init NoCloud seed (:mod:`.nocloud`);
- ``cernvm``: CernVM/HEPiX context CD plus NoCloud volume, multipart user-data
  (:mod:`.cernvm`);
- ``inject``: written into the job's overlay before boot, for images with no agent
  (:mod:`.inject`).
"""

from __future__ import annotations

from collections.abc import Callable

from vmbatch.config import Config
from vmbatch.contextualize.base import ContextMethod, ContextSpec
from vmbatch.contextualize.cernvm import CernVM
from vmbatch.contextualize.inject import Inject
from vmbatch.contextualize.nocloud import NoCloud

REGISTRY: dict[str, Callable[[Config], ContextMethod]] = {
    NoCloud.name: NoCloud,
    CernVM.name: CernVM,
    Inject.name: Inject,
}

__all__ = ["REGISTRY", "ContextMethod", "ContextSpec", "get_method"]


def get_method(name: str, cfg: Config) -> ContextMethod:
    """A fresh instance of the method registered as ``name``."""
    return REGISTRY[name](cfg)
