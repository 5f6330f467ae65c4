"""vmbatch's hooks installed in a :class:`SlurmCluster` as docs/admin-slurm.md says.

Prolog/Epilog are shims that exec vmbatch's hooks, ``PrologFlags=Alloc``, ``job_submit.lua``
gives every job in the scope of ``vmbatch.lua`` (every job, unless ``scope_lua`` narrows it)
vmbatch's OCI bundle (``cli_filter.lua`` every ``srun`` step of such a job), ``oci.conf``
runs ``vmbatch-starter``, and slurm.conf
turns the starter's requeue/hold statuses into requeues (``RequeueExit``/``RequeueExitHold``,
docs/admin-guide.md "Failure policy"). The only difference from a production install: the
hooks find the test's configuration through ``VMBATCH_CONFIG``. Used by the Slurm system
tests, bench/slurm.py and bench/soak.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.system.slurmcluster import SlurmCluster

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
#: slurm.conf lines of docs/admin-slurm.md (the requeue statuses are [batch]'s defaults).
HOOK_CONF = (
    "PrologFlags=Alloc",
    "PrologEpilogTimeout=600",
    "RequeueExit=199",
    "RequeueExitHold=200",
)


def hook_shim(path: Path, config: Path, program: str) -> Path:
    """What scripts/prologue is in production, plus VMBATCH_CONFIG: exec ``program``."""
    path.write_text(f'#!/bin/sh\nVMBATCH_CONFIG={config} exec {BIN / program} "$@"\n')
    path.chmod(0o755)
    return path


def vmbatch_cluster(
    root: Path,
    config: Path,
    *,
    prolog: Path | None = None,
    epilog: Path | None = None,
    extra_conf: tuple[str, ...] | list[str] = (),
    scope_lua: str = "",
    **cluster_args: object,
) -> SlurmCluster:
    """A (not yet started) cluster whose jobs run in VMs through vmbatch's hooks.

    The shims, the bundle copy, ``vmbatch.lua`` and nothing else are written under ``root``
    (root-owned, world-traversable: slurmd, the job user and QEMU pass through it), and
    ``[slurm].bundle`` naming that bundle goes into a drop-in beside ``config``
    (``<stem>.d/90-slurm-bundle.toml``). ``prolog``/``epilog`` replace the plain shims (a glob of
    several scripts; bench/slurm.py times the Epilog); ``extra_conf`` follows HOOK_CONF;
    ``scope_lua`` is Lua run after vmbatch.lua's site settings (``M.scope.partitions =
    { "vm" }``).
    """
    bundle = root / "slurm-bundle"
    shutil.copytree(ROOT / "conf" / "slurm" / "bundle", bundle)
    for p in (bundle, bundle / "rootfs", bundle / "config.json"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    dropins = config.with_name(config.stem + ".d")  # vmbatch.config.config_files
    dropins.mkdir(mode=0o755, exist_ok=True)
    (dropins / "90-slurm-bundle.toml").write_text(f'[slurm]\nbundle = "{bundle}"\n')
    module = root / "vmbatch.lua"
    text = (ROOT / "conf" / "slurm" / "vmbatch.lua").read_text()
    text = text.replace('"/etc/vmbatch/slurm-bundle"', f'"{bundle}"')
    module.write_text(text.replace("\nreturn M\n", f"\n{scope_lua}\nreturn M\n"))
    module.chmod(0o644)
    lua = (ROOT / "conf" / "slurm" / "job_submit.lua").read_text()
    lua = lua.replace('"/etc/slurm/vmbatch.lua"', f'"{module}"')
    cli = (ROOT / "conf" / "slurm" / "cli_filter.lua").read_text()
    cli = cli.replace('"/etc/slurm/vmbatch.lua"', f'"{module}"')
    oci = (ROOT / "conf" / "slurm" / "oci.conf").read_text()
    oci = oci.replace("exec /opt/vmbatch/bin/", f"exec env VMBATCH_CONFIG={config} {BIN}/")
    oci = oci.replace("/opt/vmbatch/bin/", f"{BIN}/")
    taskprolog = root / "taskprolog"
    taskprolog.write_text(
        f"#!/bin/sh\nVMBATCH_CONFIG={config} exec {BIN / 'python'} -I -m vmbatch.hooks.taskprolog\n"
    )
    taskprolog.chmod(0o755)
    return SlurmCluster(
        prolog=prolog or hook_shim(root / "prolog", config, "vmbatch-prologue"),
        epilog=epilog or hook_shim(root / "epilog", config, "vmbatch-epilogue"),
        extra_conf=[*HOOK_CONF, f"TaskProlog={taskprolog}", *extra_conf],
        oci_conf=oci,
        job_submit_lua=lua,
        cli_filter_lua=cli,
        **cluster_args,  # type: ignore[arg-type]
    )
