"""vmbatch on one partition of a real Slurm 22.05, beside a site's own Prolog and Epilog.

One node in two partitions: ``vm`` is in vmbatch's scope (``vmbatch.lua``:
``M.scope.partitions = { "vm" }``, jobs may opt out), the default partition ``test`` is
not. slurm.conf names ``Prolog=<dir>/prolog.d/*`` and ``Epilog=<dir>/epilog.d/*`` as
docs/admin-slurm.md says: the site's own scripts (each writes a marker per job) and
vmbatch's shims side by side. Jobs in each partition behave as configured, told apart by
``/proc/cmdline`` (the tiny guest's kernel command line is not the host's); the site's
Prolog and Epilog run for every job; nothing is left behind.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.conftest import BatchSite, SlurmSite
from tests.system.slurmhooks import hook_shim, vmbatch_cluster
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name

MARKER = "cryptomgr.notests"  # on the tiny guest's kernel command line, not the host's
SCOPE = 'M.scope.partitions = { "vm" }\nM.scope.job_choice = "opt_out"'
#: The job's /proc/cmdline, and whether vmbatch made the job's user directory on the node.
CMDLINE = (
    "#!/bin/sh\n{directive}cat /proc/cmdline\n"
    "if test -e {user_dir}/$SLURM_JOB_ID; then echo vm-dir; fi\n"
)


def _site_script(path: Path, markers: Path, kind: str) -> None:
    """The site's own Prolog/Epilog: one marker file per job, as root."""
    path.write_text(
        f'#!/bin/sh\necho "$SLURM_JOB_PARTITION" > {markers}/{kind}-"$SLURM_JOB_ID"\nexit 0\n'
    )
    path.chmod(0o755)


@pytest.fixture
def scoped(batch_site: BatchSite) -> Iterator[tuple[SlurmSite, Path]]:
    root, config = batch_site.site.root, batch_site.site.config
    markers = root / "site-markers"
    markers.mkdir(mode=0o755)
    prolog_d, epilog_d = root / "prolog.d", root / "epilog.d"
    for d in (prolog_d, epilog_d):
        d.mkdir(mode=0o755)
    _site_script(prolog_d / "50-site", markers, "prolog")
    _site_script(epilog_d / "50-site", markers, "epilog")
    # slurmd runs them in reverse lexical order: the site's Prolog, then vmbatch's; vmbatch's
    # Epilog, then the site's (docs/admin-slurm.md)
    hook_shim(prolog_d / "10-vmbatch", config, "vmbatch-prologue")
    hook_shim(epilog_d / "90-vmbatch", config, "vmbatch-epilogue")
    cluster = vmbatch_cluster(
        root,
        config,
        prolog=prolog_d / "*",
        epilog=epilog_d / "*",
        scope_lua=SCOPE,
        partitions=("vm",),
    )
    with cluster:
        yield SlurmSite(batch_site, cluster), markers
        node = cluster.node()
        assert "DRAIN" not in node["State"], f"node drained: {node.get('Reason')}"


def _sbatch(slurm: SlurmSite, partition: str, directive: str = "") -> str:
    script = CMDLINE.format(directive=directive, user_dir=slurm.bs.user_dir)
    return slurm.cluster.sbatch(script, slurm.user.name, slurm.user.home, "-p", partition)


def _in_vm(output: str) -> bool:
    host = Path("/proc/cmdline").read_text()
    assert MARKER not in host
    if MARKER in output:
        return True
    assert output.startswith(host), output  # the host's own kernel command line
    return False


def test_a_partition_with_vms_beside_one_without_and_the_sites_prolog_runs_for_both(
    scoped: tuple[SlurmSite, Path], libvirt_conn: Connection
) -> None:
    slurm, markers = scoped
    in_vm = _sbatch(slurm, "vm")
    on_host = _sbatch(slurm, "test")
    opted_out = _sbatch(slurm, "vm", "#VMBATCH vm=no\n")
    jobs = {in_vm: "vm", on_host: "test", opted_out: "vm"}
    for job_id in jobs:
        assert slurm.settled(job_id)["ExitCode"] == "0:0", slurm.output(job_id)
    assert _in_vm(slurm.output(in_vm))
    for job_id in (on_host, opted_out):
        out = slurm.output(job_id)
        assert not _in_vm(out) and "vm-dir" not in out  # no VM, no user directory
        assert not libvirt_conn.is_running(domain_name(job_id))
    # The site's Prolog and Epilog ran for every job, in its own partition.
    for job_id, partition in jobs.items():
        for kind in ("prolog", "epilog"):
            assert (markers / f"{kind}-{job_id}").read_text() == f"{partition}\n", kind
    # Only the job with a VM has vmbatch's accounting line; nothing is left anywhere.
    assert [r["job_id"] for r in slurm.bs.records()] == [in_vm]
    assert not slurm.bs.leftovers()
    doctor = slurm.bs.site.vmbatch("doctor", env=slurm.cluster.env()).stdout.decode()
    root = slurm.bs.site.root
    order = "runs, in this order:"
    assert f"ok   slurm prolog: Prolog={root}/prolog.d/* {order} {root}/prolog.d/50-site," in doctor
    assert (
        f"ok   slurm epilog: Epilog={root}/epilog.d/* {order} {root}/epilog.d/90-vmbatch," in doctor
    )
    assert f"ok   slurm scope: jobs that job_submit.lua gives the container {root}/" in doctor


def test_srun_steps_follow_their_jobs_partition(scoped: tuple[SlurmSite, Path]) -> None:
    """srun that submits its own job (cli_filter.lua decides as job_submit.lua will), and
    srun inside a salloc allocation (cli_filter.lua asks slurmctld for the job's mark)."""
    slurm, _ = scoped
    r = slurm.srun("-p", "vm", "cat", "/proc/cmdline")
    assert r.returncode == 0 and _in_vm(r.stdout.decode()), r
    r = slurm.srun("cat", "/proc/cmdline")  # the default partition: no VMs
    assert r.returncode == 0 and not _in_vm(r.stdout.decode()), r
    r = slurm.srun("-n", "2", "-p", "test", "echo", "task")  # no one-task-per-node rule here
    assert (r.returncode, r.stdout) == (0, b"task\ntask\n"), r
    for partition, vm in (("vm", True), ("test", False)):
        r = subprocess.run(
            ["runuser", "-u", slurm.user.name, "--", "salloc", "-p", partition,
             "srun", "cat", "/proc/cmdline"],
            cwd=slurm.user.home, env=slurm.cluster.env(), capture_output=True, timeout=300,
            check=False,
        )  # fmt: skip
        assert r.returncode == 0 and _in_vm(r.stdout.decode()) is vm, r
    _no_jobs_left(slurm)
    assert not slurm.bs.leftovers()


def test_what_the_scope_cannot_honour_is_refused_at_submission(
    scoped: tuple[SlurmSite, Path],
) -> None:
    slurm, _ = scoped
    cases = [
        (("-p", "test"), "#VMBATCH vm=yes\n", "the job asks for a VM ('#VMBATCH vm=yes'),"
         " but jobs of partition test run without one on this cluster"),
        (("-p", "vm,test"), "", "the job may run in partitions with and without vmbatch VMs"
         " (partition vm,test); submit it to partitions of one kind"),
        (("-p", "test", f"--container={slurm.bs.site.root}/slurm-bundle"), "",
         "this job names vmbatch's container, but jobs of test run without a VM here"),
    ]  # fmt: skip
    for args, directive, message in cases:
        r = subprocess.run(
            ["runuser", "-u", slurm.user.name, "--", "sbatch", *args],
            input=f"#!/bin/sh\n{directive}true\n", cwd=slurm.user.home,
            env=slurm.cluster.env(), capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert r.returncode != 0 and f"sbatch: error: vmbatch: {message}\n" in r.stderr, r
    # A pending job cannot move across the scope: its container cannot change.
    held = slurm.cluster.sbatch("#!/bin/sh\ntrue\n", slurm.user.name, slurm.user.home,
                                "-p", "vm", "--hold")  # fmt: skip
    r = subprocess.run(
        ["runuser", "-u", slurm.user.name, "--", "scontrol", "update", f"jobid={held}",
         "partition=test"],
        env=slurm.cluster.env(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert r.returncode != 0 and slurm.cluster.job(held)["Partition"] == "vm", r
    # 22.05's scontrol shows no job_submit message for an update; slurmctld's log has it
    assert r.stderr == f"Unspecified error for job {held}\n", r
    log = (slurm.cluster.dir / "log" / "slurmctld.log").read_text(errors="replace")
    assert f"vmbatch: job {held} cannot move out of a vmbatch VM's scope" in log
    subprocess.run(["scancel", held], env=slurm.cluster.env(), timeout=30, check=True)
    _no_jobs_left(slurm)


def _no_jobs_left(slurm: SlurmSite, timeout: float = 120) -> None:
    """Every job ended and its Epilog ran (the node is no longer COMPLETING)."""
    deadline = time.monotonic() + timeout
    env = slurm.cluster.env()
    while (
        subprocess.run(
            ["squeue", "-h"], env=env, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        or "COMPLETING" in slurm.cluster.node()["State"]
    ):
        assert time.monotonic() < deadline, slurm.cluster.node()
        time.sleep(0.2)  # polling with a deadline
