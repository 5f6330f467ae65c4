"""The accounting line of each way a Slurm job can end, against what slurmctld reports.

One real Slurm 22.05 cluster (4 CPUs on the node, so the four jobs run at once in four tiny
guests): a job that exits 0, one that exits 7, one ``scancel``ed while its script runs (it
traps SIGTERM and exits 3: Slurm's ``ExitCode=3:0`` arrives after the Epilog's environment
was made, which said ``0:0``), and one ``scancel``ed while its VM boots (its script never
runs). The Epilog's own environment is checked to have said ``0:0`` for the third. Each
line must carry the ``ExitCode`` that ``scontrol show job`` shows (read while
the job is still known: ``MinJobAge`` 300 s), and say whether the script ran, why not, and
its run time only if it did. ``vmbatch report`` then summarises the four lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from tests.system.conftest import BatchSite, SlurmSite
from tests.system.slurmhooks import vmbatch_cluster
from vmbatch.hooks.accounting import CANCELLED_DURING_BOOT


def _until(done: Callable[[], bool], detail: Callable[[], object], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, detail()
        time.sleep(0.1)  # polling with a deadline


def test_each_record_matches_slurms_exit_code_and_says_whether_the_script_ran(
    batch_site: BatchSite,
) -> None:
    root, config = batch_site.site.root, batch_site.site.config
    # debug2: slurmd logs the Epilog's output (prep_script_slurmd.c, on success).
    with vmbatch_cluster(root, config, cpus=4, extra_conf=["SlurmdDebug=debug2"]) as cluster:
        slurm = SlurmSite(batch_site, cluster)
        home = slurm.user.home
        booting = slurm.submit("#!/bin/sh\necho ran\n")
        record = batch_site.state_dir / f"{booting}.json"
        # The Prolog has written the job's record: its VM is being made. Cancel now.
        _until(record.exists, lambda: (cluster.job(booting), cluster.slurmd_log()[-3000:]))
        assert json.loads(record.read_text())["phase"] == "preparing"
        cluster._run("scancel", booting)
        ok = slurm.submit("#!/bin/sh\necho fine\n")
        seven = slurm.submit("#!/bin/sh\necho failing\nexit 7\n")
        running = slurm.submit(
            "#!/bin/sh\ntrap 'echo got-term; exit 3' TERM\necho started\n"
            "while :; do sleep 1; done\n"
        )
        out = home / f"slurm-{running}.out"
        _until(
            lambda: out.exists() and "started\n" in out.read_text(errors="replace"),
            lambda: (cluster.job(running), out.exists() and out.read_text(errors="replace")),
        )
        cluster._run("scancel", running)
        jobs = {j: slurm.settled(j) for j in (booting, ok, seven, running)}
        lines = {r["job_id"]: r for r in batch_site.records()}
        for job_id in (ok, seven, running, booting):  # with -s: the docs' example
            print(json.dumps(lines.get(job_id), sort_keys=True))
        assert sorted(lines) == sorted(jobs), lines

        for job_id, job in jobs.items():
            line = lines[job_id]
            status, signal = (int(n) for n in job["ExitCode"].split(":"))
            assert (line["exit_status"], line["exit_signal"]) == (status, signal), (job, line)
            assert line["exit_source"] == "slurmctld" and line["format"] == 2, line
            assert line["user"] == slurm.user.name and line["image"] == "demo", line
            assert isinstance(line["boot_seconds"], float) and line["boot_seconds"] > 0, line
            assert isinstance(line["qemu_cpu_seconds"], float), line

        assert (jobs[ok]["JobState"], jobs[ok]["ExitCode"]) == ("COMPLETED", "0:0")
        assert (jobs[seven]["JobState"], jobs[seven]["ExitCode"]) == ("FAILED", "7:0")
        assert (jobs[running]["JobState"], jobs[running]["ExitCode"]) == ("CANCELLED", "3:0")
        assert "got-term" in slurm.output(running)
        # What the Epilog was told: 0:0, set when slurmctld ended the job, before the
        # script's own status arrived (vmbatch.hooks.accounting, "Exit status").
        assert (
            f"vmbatch-epilogue[{running}]: INFO: slurmctld reports ExitCode=3:0; the Epilog's"
            " SLURM_JOB_EXIT_CODE2 was 0:0"
        ) in cluster.slurmd_log()
        for job_id in (ok, seven, running):
            line = lines[job_id]
            assert line["script_ran"] is True and line["cause"] is None, line
            assert isinstance(line["run_seconds"], float) and line["run_seconds"] >= 0, line
        assert lines[running]["run_seconds"] > 0

        assert (jobs[booting]["JobState"], jobs[booting]["ExitCode"]) == ("CANCELLED", "0:0")
        never = lines[booting]
        assert never["script_ran"] is False and never["run_seconds"] is None, never
        assert never["cause"] == CANCELLED_DURING_BOOT, never
        booting_out = home / f"slurm-{booting}.out"
        assert not booting_out.exists() or "ran" not in booting_out.read_text(errors="replace")

        report = batch_site.site.vmbatch("report", "--json", "--file", str(batch_site.accounting))
        summary = json.loads(report.stdout)
        print(report.stdout.decode())  # with -s: the docs' example
        assert (summary["jobs"], summary["failed"], summary["script_ran"]) == (4, 3, 3), summary
        assert summary["failures_by_cause"] == {
            CANCELLED_DURING_BOOT: 1,
            "exit status 3": 1,
            "exit status 7": 1,
        }, summary
        assert summary["users"][slurm.user.name]["jobs"] == 4
        text = batch_site.site.vmbatch("report", "--file", str(batch_site.accounting))
        assert text.returncode == 0 and b"jobs: 4  failed: 3  script ran: 3" in text.stdout
        print(text.stdout.decode())  # with -s: the docs' example
