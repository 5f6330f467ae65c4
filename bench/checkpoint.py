#!/usr/bin/env python3
"""Checkpoint benchmark: size and time of ``vmbatch checkpoint`` for a 256 MiB and a 1 GiB
guest, and restoring a job from its checkpoint against booting it afresh.

For each guest size, one batch job (the batch hooks in this process, as root, job user
``vmbbench``, made for the run and removed after; tiny guest unless --guest says otherwise):

1. fresh boot: the prologue (``batch.prologue``) until the VM answers SSH;
2. the guest fills ``--fill`` of its memory with random data (in its RAM root file
   system, as much as that takes), so that the save has that much to write;
3. ``checkpoint.take(then="continue")``: pause, save, copy, manifest, restore, running
   again: its time and the checkpoint's size (memory save, disks);
4. ``checkpoint.take(then="stop")``, then the epilogue (which keeps the checkpoint) and the
   next run's prologue, which restores it: the restore time to compare with step 1.

Figures only. usage: bench/checkpoint.py [--guest /var/cache/vmbatch/guests/tiny]
                                         [--sizes 256,1024] [--fill 0.4]
"""

from __future__ import annotations

import argparse
import io
import json
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import WORK

from vmbatch import checkpoint, config
from vmbatch.contextualize.keys import KeyPair
from vmbatch.guest import ssh
from vmbatch.hooks import batch
from vmbatch.hooks.jobstate import UserDir
from vmbatch.hooks.request import Resources

USER = "vmbbench"


def bench_config(guest: Path, memory: int) -> config.Config:
    tiny = (guest / "vmlinux").is_file()
    image = {
        "source": str(guest / "disk.qcow2"),
        "format": "qcow2",
        "kernel": str(guest / ("vmlinux" if tiny else "vmlinuz")),
        "initrd": str(guest / ("initrd.cpio" if tiny else "initrd.img")),
        "cmdline": (guest / "cmdline").read_text().strip(),
        "memory": memory,
    }
    if tiny:
        image |= {"firmware": "/usr/share/qemu/qboot.rom"}
    return config.parse(
        {
            "paths": {"job_dir": str(WORK / "jobs"), "cache_dir": str(WORK / "cache")},
            "vm": {"outbound_network": False, "boot_timeout": 600},
            "batch": {
                "default_image": "demo",
                "state_dir": str(WORK / "state"),
                "user_dir": str(WORK / "run"),
                "accounting_log": str(WORK / "accounting.jsonl"),
            },
            "checkpoint": {"dir": str(WORK / "checkpoints")},
            "images": {"demo": image},
        }
    )


def in_guest(cfg: config.Config, job_id: str, command: str) -> bytes:
    userdir = UserDir(cfg.batch.user_dir, job_id)
    info, key = userdir.guest(), userdir.read(UserDir.KEY)
    assert info is not None and key is not None
    endpoint = ssh.Endpoint(
        port=int(info["port"]),
        user=str(info["user"]),
        client_key=KeyPair(key.decode(), ""),
        host_key=KeyPair("", str(info["host_key"])),
    )
    client = ssh.connect(endpoint)
    try:
        out, err = io.BytesIO(), io.BytesIO()
        status = ssh.run(client, ("sh", "-c", command), out, err, timeout=900)
        assert status == 0, err.getvalue()
        return out.getvalue()
    finally:
        client.close()


def prologue(cfg: config.Config, job_id: str) -> float:
    job = batch.BatchJob("torque", job_id, USER, Resources())
    t0 = time.perf_counter()
    error = batch.prologue(cfg, job)
    assert error is None, error
    return time.perf_counter() - t0


def one(guest: Path, memory: int, fill: float) -> None:
    cfg = bench_config(guest, memory)
    job_id = f"bench-ckpt-{memory}"
    batch.finish(cfg, job_id)
    shutil.rmtree(checkpoint.job_base(cfg, job_id), ignore_errors=True)
    try:
        fresh = prologue(cfg, job_id)
        # As much as its RAM file system takes (about half the memory, less the initramfs).
        wrote = in_guest(
            cfg,
            job_id,
            f"dd if=/dev/urandom of=/var/tmp/fill bs=1048576 count={int(memory * fill)}"
            " 2>/dev/null; wc -c < /var/tmp/fill",
        )
        mib = int(wrote) // 2**20
        taken = checkpoint.take(cfg, job_id, then="continue")
        files = taken.checkpoint.manifest["files"]
        save = files[checkpoint.MEMORY]["size"] / 2**20
        disks = sum(f["size"] for n, f in files.items() if n.startswith("disks/")) / 2**20
        stopped = checkpoint.take(cfg, job_id, then="stop")
        batch.finish(cfg, job_id)  # the epilogue: keeps the checkpoint for the requeue
        restore = prologue(cfg, job_id)
        info = UserDir(cfg.batch.user_dir, job_id).guest() or {}
        assert info.get("restored") == stopped.checkpoint.generation, info
        print(
            json.dumps(
                {
                    "guest_mib": memory,
                    "filled_mib": mib,
                    "checkpoint_continue_s": round(taken.seconds, 2),
                    "checkpoint_stop_s": round(stopped.seconds, 2),
                    "memory_save_mib": round(save, 1),
                    "disks_mib": round(disks, 1),
                    "fresh_boot_s": round(fresh, 2),
                    "restore_s": round(restore, 2),
                }
            )
        )
    finally:
        checkpoint.clear_requeue(cfg, job_id)
        batch.finish(cfg, job_id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", type=Path, default=Path("/var/cache/vmbatch/guests/tiny"))
    ap.add_argument("--sizes", default="256,1024", help="guest memory sizes in MiB")
    ap.add_argument("--fill", type=float, default=0.4, help="share of the memory filled")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    WORK.chmod(0o755)
    try:
        pwd.getpwnam(USER)
        made = False
    except KeyError:
        subprocess.run(["/usr/sbin/useradd", "-M", "-s", "/bin/sh", USER], check=True, timeout=30)
        made = True
    try:
        for memory in (int(m) for m in args.sizes.split(",")):
            one(args.guest.resolve(), memory, args.fill)
    finally:
        if made:
            subprocess.run(["/usr/sbin/userdel", USER], check=False, timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
