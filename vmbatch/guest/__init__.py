"""Talking to the guest over SSH (paramiko) with a pinned host key."""
