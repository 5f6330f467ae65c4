"""``python -m vmbatch``: the same as the ``vmbatch`` command."""

from vmbatch.cli import entry

entry()
