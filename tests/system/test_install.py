"""Issue 16: docs/admin-slurm.md followed literally on a node whose Slurm already runs: its
shell commands, in order, copied from the guide, then a job through the installed hooks
(not the checkout's ``.venv``).

What this machine allows, and so the only changes made to the guide's commands:
- ``scripts/install-node`` gets ``--wheelhouse`` (built from this checkout with
  ``scripts/build-wheelhouse``, as the guide says for offline nodes), ``--no-packages``
  (they are installed), ``--no-systemd`` (systemd is not PID 1 here), and a fresh
  ``--prefix``/``--etc``/``--config`` instead of ``/opt/vmbatch``/``/etc/vmbatch``, whose
  paths are then rewritten in the copied files the same way;
- ``/etc/slurm`` is the test cluster's configuration directory, and ``systemctl restart``
  restarts its daemons by PID;
- the hooks use this test's configuration (the demo image): the Prolog's shim through
  ``--config``, the job starter through ``VMBATCH_CONFIG`` in slurmd's environment. The
  guide's own TOML snippets are checked by tests/integration/test_doc_snippets.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.integration.test_doc_snippets import snippets
from tests.system.conftest import BatchSite, SlurmSite
from tests.system.slurmcluster import SlurmCluster

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "admin-slurm.md"
MARKER = "cryptomgr.notests"  # on the tiny guest's kernel command line, not the host's
_SH = re.compile(r"^( *)```sh\n(.*?)^\1```", re.M | re.S)


def guide_steps() -> str:
    """The guide's "Steps" section: what a site with no Prolog of its own does."""
    text = GUIDE.read_text()
    start = text.index("\n## Steps")
    return text[start : text.index("\n## ", start + 1)]


def guide_commands() -> list[str]:
    """Every command line of the steps' ```sh blocks, in order (comments dropped)."""
    lines = []
    for m in _SH.finditer(guide_steps()):
        for line in m.group(2).splitlines():
            command = line.strip().split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def _sh(
    command: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip


def test_the_slurm_guide_followed_literally_runs_a_job_in_a_vm(
    batch_site: BatchSite, tmp_path: Path
) -> None:
    root, config = batch_site.site.root, batch_site.site.config
    wheels, prefix, etc = root / "wheelhouse", root / "opt-vmbatch", root / "etc-vmbatch"
    built = _sh(f"scripts/build-wheelhouse {wheels}")
    assert built.returncode == 0, built
    commands = guide_commands()
    assert commands[0] == "scripts/install-node", commands
    assert any(c.startswith("sbatch ") for c in commands), commands

    # The test's configuration names the bundle the install laid out, as /etc/vmbatch's
    # default [slurm].bundle names /etc/vmbatch/slurm-bundle.
    dropins = config.parent / f"{config.stem}.d"
    dropins.mkdir(exist_ok=True)
    (dropins / "90-slurm-bundle.toml").write_text(f'[slurm]\nbundle = "{etc}/slurm-bundle"\n')
    with SlurmCluster(daemon_env={"VMBATCH_CONFIG": str(config)}) as cluster:
        slurm_etc = cluster.conf.parent

        def local(text: str) -> str:
            text = text.replace("/opt/vmbatch", str(prefix)).replace("/etc/vmbatch", str(etc))
            return text.replace("/etc/slurm/", f"{slurm_etc}/")

        job_id = None
        for command in commands:
            if command.startswith(
                ("/opt/vmbatch/bin/vmbatch doctor", "/opt/vmbatch/bin/vmbatch image pull")
            ):
                continue  # the guide's image is on the internet; the jobs use the demo image
            if command == "scripts/install-node":
                command += (f" --wheelhouse {wheels} --no-packages --no-systemd"
                            f" --prefix {prefix} --etc {etc} --config {config}")  # fmt: skip
            if command.startswith("systemctl restart"):
                for copied in slurm_etc.iterdir():  # the guide's files, for this prefix
                    if copied.is_file() and not copied.is_symlink():
                        copied.write_text(local(copied.read_text()))
                cluster.restart()
                continue
            if command.startswith("sbatch "):
                r = _sh(f"runuser -u {batch_site.user.name} -- {command} --parsable",
                        env=cluster.env(), cwd=batch_site.user.home)  # fmt: skip
                assert r.returncode == 0, r
                job_id = r.stdout.strip()
                continue
            if command.endswith("vmbatch config check"):
                command += " /etc/vmbatch/vmbatch.toml"  # the guide's files, in `etc`
            r = _sh(local(command))
            assert r.returncode == 0, (command, r)
            if command.startswith("scripts/install-node"):
                steps = tmp_path / "steps.md"
                steps.write_text(guide_steps())
                for target, text in snippets(steps):  # step 2's TOML, pasted as it says
                    (etc / target.removeprefix("/etc/vmbatch/")).write_text(text)

        # The installed environment is its own, on the distribution's Python.
        assert str((prefix / "bin" / "python").resolve()).startswith("/usr/bin/python3")
        assert str(ROOT) not in (prefix / "libexec" / "prologue").read_text()
        health = (prefix / "libexec" / "healthcheck").read_text()  # Slurm's HealthCheckProgram
        assert f"exec {prefix}/bin/vmbatch " in health and " check --take-out" in health
        assert job_id is not None
        slurm = SlurmSite(batch_site, cluster)
        job = slurm.settled(job_id, timeout=300)
        out = slurm.output(job_id)
        assert job["ExitCode"] == "0:0", (job, out)
        assert MARKER in out and f"uid={batch_site.user.uid}(" in out, out
        assert MARKER not in Path("/proc/cmdline").read_text()
        step = slurm.srun("sh", "-c", "cat /proc/cmdline")  # a step: cli_filter.lua too
        assert step.returncode == 0 and MARKER in step.stdout.decode(), step
    assert [r["exit_status"] for r in batch_site.records()] == [0, 0]
    removed = _sh(f"scripts/install-node --uninstall --prefix {prefix} --etc {etc} --no-systemd")
    assert removed.returncode == 0 and not prefix.exists(), removed
    assert os.path.isdir(etc)  # the configuration stays without --purge
