"""vmbatch: run every batch job in its own throw-away virtual machine."""

from __future__ import annotations

__version__ = "0.1.0"
