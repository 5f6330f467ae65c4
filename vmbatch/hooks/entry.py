"""Console scripts for the batch-system hooks (``vmbatch-prologue``, ``-epilogue``,
``-starter``). The batch-system integration issue implements them; until then each says so
and exits with the node-offline code, so a site that wires them in early notices at once."""

from __future__ import annotations

import sys

from vmbatch import __version__
from vmbatch.errors import Disposition
from vmbatch.hooks.exitcodes import CLI


def _not_yet(name: str) -> None:
    sys.stderr.write(
        f"{name}: vmbatch {__version__} does not implement the batch-system hooks"
        " yet; remove it from the scheduler's configuration\n"
    )
    sys.exit(CLI[Disposition.OFFLINE_NODE])


def prologue() -> None:
    _not_yet("vmbatch-prologue")


def epilogue() -> None:
    _not_yet("vmbatch-epilogue")


def starter() -> None:
    _not_yet("vmbatch-starter")
