"""Per-job SSH keys, generated on the host with ``cryptography`` (no ssh-keygen needed).

Both keys are Ed25519 in OpenSSH formats: the client key pair authorizes vmbatch in the guest,
the host key pair is installed as the guest's SSH host key, so its public half is known before
boot and pinned (never trusted on first use).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An Ed25519 key pair: OpenSSH private key (PEM text) and ``ssh-ed25519 AAAA... comment``."""

    private_openssh: str
    public_openssh: str

    def __repr__(self) -> str:  # never print private keys in logs or tracebacks
        return f"KeyPair(public={self.public_openssh!r})"


def generate(comment: str) -> KeyPair:
    """A fresh Ed25519 key pair; ``comment`` ends up after the public key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )
    safe_comment = "".join(c for c in comment if c.isalnum() or c in "._-@")
    return KeyPair(private, f"{public} {safe_comment}".strip())
