"""The sshd settings every contextualization method puts first in the guest's sshd_config.

A job's guest is reached through a port on the node's loopback, so every local user can
talk to its sshd. Only the per-job key may get in: an image with password accounts and PAM
must not take password guesses. :data:`AUTH_SETTINGS` turns off both ways a password is
asked for:

- ``PasswordAuthentication no``: the ``password`` method;
- ``KbdInteractiveAuthentication no``: ``keyboard-interactive``, through which PAM asks for
  the password when ``UsePAM yes`` (the default of Debian, Ubuntu and RHEL images);
- ``ChallengeResponseAuthentication no``: before OpenSSH 8.7 a separate option, default
  ``yes``, that switched keyboard-interactive back on whatever ``KbdInteractiveAuthentication``
  said (sshd.c: "challenge-response is implemented via keyboard interactive"); since 8.7 an
  alias of ``KbdInteractiveAuthentication`` (servconf.c), so harmless there;
- ``PubkeyAuthentication yes``: the per-job key.

Placement, sshd_config(5): "for each keyword, the first obtained value will be used", and
an ``Include`` is read where it stands. Debian 12's ``/etc/ssh/sshd_config`` (OpenSSH 9.2)
starts with ``Include /etc/ssh/sshd_config.d/*.conf``, as RHEL 9's does, so a drop-in there
wins only if no drop-in sorting before it sets the keyword, and an image without that
``Include`` (RHEL/CentOS 7 and 8, CernVM 4) never reads it at all: the settings would
silently not apply. Lines put at the very top of ``sshd_config`` come before the
``Include`` and before everything else, so they win on both kinds of image. (A ``Match``
block in the image can still override them for the users it matches; vmbatch does not edit
those.)

Two writers, one text: :mod:`.inject` edits the file offline with :func:`prepend`; the
cloud-init methods (:mod:`.nocloud`, and :mod:`.cernvm` through it) do it in the guest at
boot with the shell command from :func:`prepend_command`, whose result is byte for byte the
same (an integration test runs it).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

SSHD_CONFIG = "/etc/ssh/sshd_config"
#: First line of vmbatch's block; the shell command skips a file that already has it.
MARKER = "# vmbatch: per-job settings, first so that they win (sshd keeps the first value)."
#: Authentication: the per-job key only (see the module doc for each line).
AUTH_SETTINGS = (
    "PasswordAuthentication no",
    "KbdInteractiveAuthentication no",
    "ChallengeResponseAuthentication no",
    "PubkeyAuthentication yes",
)


def block(extra: Sequence[str] = ()) -> list[str]:
    """vmbatch's lines, in order: the marker, :data:`AUTH_SETTINGS`, then ``extra``."""
    return [MARKER, *AUTH_SETTINGS, *extra]


def prepend(original: str, extra: Sequence[str] = ()) -> str:
    """``original`` with vmbatch's block and a blank line in front of it."""
    return "\n".join(block(extra)) + "\n\n" + original


def prepend_command(path: str = SSHD_CONFIG) -> str:
    """A POSIX sh command that does :func:`prepend` to ``path`` in the guest.

    Once only (a file that has the marker is left alone: cloud-init's ``bootcmd`` runs on
    every boot), and only if the file exists. The file is rewritten in place (``cat >``), so
    it keeps its inode, owner, mode and SELinux label.
    """
    f = shlex.quote(path)
    tmp = shlex.quote(path + ".vmbatch")
    lines = " ".join(shlex.quote(line) for line in [*block(), ""])
    return (
        f"if [ -f {f} ] && ! grep -qxF {shlex.quote(MARKER)} {f}; then"
        f" {{ printf '%s\\n' {lines} && cat {f}; }} >{tmp} && cat {tmp} >{f};"
        f" rm -f {tmp}; fi"
    )
