"""The shells vmbatch's generated guest scripts must run under: dash (Debian's /bin/sh),
bash, and busybox ash (the tiny guest, CernVM's initramfs tools)."""

from __future__ import annotations

import shutil

SHELLS = {
    "dash": ["/bin/sh"],
    "bash": ["/bin/bash"],
    "busybox": [shutil.which("busybox") or "/bin/busybox", "sh"],
}
