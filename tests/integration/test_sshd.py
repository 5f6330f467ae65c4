"""The cloud-init methods' sshd edit (a ``bootcmd``), run by the real /bin/sh on real files.

It must leave exactly what offline injection writes (:func:`vmbatch.contextualize.sshd.prepend`),
keep the file's inode and mode (SELinux label, owner), and do nothing the second time (the
guest rebooted) or when the image has no sshd_config.
"""

from __future__ import annotations

import stat
from pathlib import Path

from vmbatch import process
from vmbatch.contextualize import sshd

#: The head of Debian 12's /etc/ssh/sshd_config, plus what a password-friendly image adds.
DEBIAN = (
    "# This is the sshd server system-wide configuration file.\n"
    "\n"
    "Include /etc/ssh/sshd_config.d/*.conf\n"
    "\n"
    "KbdInteractiveAuthentication yes\n"
    "PasswordAuthentication yes\n"
    "UsePAM yes\n"
)


def _boot(path: Path) -> None:
    process.run(["/bin/sh", "-c", sshd.prepend_command(str(path))], timeout=10)


def test_boot_command_writes_what_injection_writes_once(tmp_path: Path) -> None:
    conf = tmp_path / "it's an ssh dir" / "sshd_config"  # quoting is the command's job
    conf.parent.mkdir()
    conf.write_text(DEBIAN)
    conf.chmod(0o640)
    inode = conf.stat().st_ino
    _boot(conf)
    assert conf.read_text() == sshd.prepend(DEBIAN)
    assert (conf.stat().st_ino, stat.S_IMODE(conf.stat().st_mode)) == (inode, 0o640)
    assert sorted(p.name for p in conf.parent.iterdir()) == ["sshd_config"]
    _boot(conf)  # the guest rebooted: bootcmd runs again
    assert conf.read_text() == sshd.prepend(DEBIAN)


def test_boot_command_leaves_an_image_without_sshd_config_alone(tmp_path: Path) -> None:
    _boot(tmp_path / "sshd_config")
    assert list(tmp_path.iterdir()) == []
