"""A real single-node Slurm 22.05 cluster for system tests: munged, slurmctld and slurmd.

Every daemon runs in the foreground (``-D``/``-F``, so the PID we hold is the daemon), is started
and stopped by PID, and keeps its state, socket, logs and PID file in a fresh directory under
``/var/lib/vmbatch/test-slurm`` (mode 0755: munge, slurm and the job users must traverse it).
Clients find the cluster through ``SLURM_CONF`` (:meth:`SlurmCluster.env`).

Facts relied on, from slurm.conf(5) of 22.05 unless noted:

- ``AuthInfo=socket=PATH`` points auth/munge and cred/munge at our own munged. munged 0.5.15
  exits if its socket/seed directory is group- or world-writable without the sticky bit, or if
  the key is readable by group or others (seen): directory 0711 owned by munge, key 0400.
- ``SlurmctldHost=host(addr)``: the controller's name and the address to reach it; ``NodeAddr``
  likewise for the slurmd. Both listen on ``SlurmctldPort``/``SlurmdPort`` (free loopback ports).
- ``SelectType=select/cons_tres`` + ``CR_Core_Memory`` allocate cores and memory; without
  ``DefMemPerCPU``, ``DefMemPerNode`` defaults to 0 (unlimited): one job would take the node.
- ``ReturnToService=2``: a DOWN node returns to service when its slurmd registers.
- ``JobCompType=jobcomp/filetxt`` appends one line per finished job (with ``ExitCode=``) to
  ``JobCompLoc``: exit codes without slurmdbd.
- ``Prolog``/``Epilog`` run as root on the node; a failing Prolog drains the node and requeues
  the job held. ``PrologFlags=Alloc`` runs the Prolog at allocation instead of at first step.
- oci.conf(5), job_submit.lua and cli_filter.lua are read from the directory of slurm.conf;
  ``JobSubmitPlugins=lua`` and ``CliFilterPlugins=lua`` enable the last two.
- ``extra_conf`` lines come after the defaults; a repeated key overrides (seen in 22.05).
- A finished job stays visible to ``scontrol show job`` for ``MinJobAge`` (default 300 s).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

BASE = Path("/var/lib/vmbatch/test-slurm")
#: Set in each daemon's environment; slurmstepd and the OCI runtime commands inherit it, which
#: lets stop() find every process this cluster started.
MARKER = "VMBATCH_TEST_SLURM"
CLIENT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: ``Key=value`` fields of ``scontrol show ... -o``; a value may contain spaces.
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w/:.]*)=")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_fields(line: str) -> dict[str, str]:
    """Parse one ``scontrol show -o`` record into its fields."""
    line = line.strip()
    found = list(_FIELD.finditer(line))
    ends = [m.start() for m in found[1:]] + [len(line)]
    return {m.group(1): line[m.end() : e].strip() for m, e in zip(found, ends, strict=True)}


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def _pids(match: Callable[[Path], bool]) -> set[int]:
    """Live PIDs whose /proc entry satisfies MATCH. Zombies are skipped: orphans wait for
    PID 1 to reap them, which on the test machines takes up to 2 s (docs/platform.md)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                if not zombie and match(entry):
                    found.add(int(entry.name))
    return found


def _kill_all(find: Callable[[], set[int]], timeout: float = 10) -> set[int]:
    """SIGKILL whatever FIND returns until it returns nothing; return the PIDs killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while pids := find():
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes survive SIGKILL: {sorted(pids)}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        time.sleep(0.1)  # polling with a deadline
    return killed


@dataclass(frozen=True)
class HostUser:
    name: str
    uid: int
    gid: int
    home: Path


class SlurmCluster:
    """One munged + slurmctld + slurmd; partition ``test`` holds this host's single node."""

    def __init__(
        self,
        prolog: Path | None = None,
        epilog: Path | None = None,
        extra_conf: list[str] | None = None,
        oci_conf: str | None = None,
        job_submit_lua: str | None = None,
        cli_filter_lua: str | None = None,
        base: Path = BASE,
        def_mem_per_cpu: int = 512,
        cpus: int | None = None,
        daemon_env: dict[str, str] | None = None,
        partitions: tuple[str, ...] = (),
        cred_expire: int | None = None,
    ) -> None:
        """``cpus``: the node's CPUs (default: this host's); more than the host has is
        accepted through ``SlurmdParameters=config_overrides`` (jobs of one CPU each then run
        ``cpus`` at a time). ``partitions``: more partitions, each of this one node, beside
        the default partition ``test``. ``cred_expire``: seconds a job credential lives
        (``AuthInfo=cred_expire``, at least 5; default 120), which is also how long a
        requeued job waits before it may start again (``_job_requeue_op`` sets its begin
        time to now + cred_expire + 1, src/slurmctld/job_mgr.c)."""
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-", dir=base))
        self.dir.chmod(0o755)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.dir / "etc" / "slurm.conf"
        self.munge_dir = self.dir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.jobcomp_file = self.dir / "log" / "jobcomp.txt"
        self.partitions = ("test", *partitions)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: Extra environment of the daemons (slurmd passes it to the Prolog and RunTimeRun).
        self.daemon_env = dict(daemon_env or {})
        self.logs: dict[str, Path] = {}
        for sub in ("etc", "state", "spool", "log", "run", "home"):
            (self.dir / sub).mkdir(mode=0o755)
        host_cpus = len(os.sched_getaffinity(0))
        cpus = cpus or host_cpus
        total_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
        d = self.dir
        lines = [
            "ClusterName=vmbatchtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}"
            + (f",cred_expire={cred_expire}" if cred_expire else ""),
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmdPidFile={d}/run/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.log",
            "SlurmctldDebug=debug",
            "SlurmdDebug=debug",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={def_mem_per_cpu}",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_file}",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            # Job ids of concurrent or earlier test clusters never meet (domain names, state
            # records and guest directories are keyed by the job id); extra_conf may override.
            f"FirstJobId={random.randrange(10_000, 5_000_000)}",  # noqa: S311 - not a secret
        ]
        lines += ["SlurmdParameters=config_overrides"] if cpus > host_cpus else []
        lines += [f"Prolog={prolog}"] if prolog else []
        lines += [f"Epilog={epilog}"] if epilog else []
        if oci_conf is not None:
            (self.dir / "etc" / "oci.conf").write_text(oci_conf)
        if job_submit_lua is not None:
            (self.dir / "etc" / "job_submit.lua").write_text(job_submit_lua)
            lines.append("JobSubmitPlugins=lua")
        if cli_filter_lua is not None:
            (self.dir / "etc" / "cli_filter.lua").write_text(cli_filter_lua)
            lines.append("CliFilterPlugins=lua")
        lines += extra_conf or []
        lines += [
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus}"
            f" RealMemory={max(total_mb - 1024, total_mb // 2)} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            *(f"PartitionName={p} Nodes={self.host} MaxTime=INFINITE State=UP" for p in partitions),
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # -- daemons -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle (polled, bounded)."""
        self.munge_dir.mkdir(mode=0o711)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        for p in (self.munge_dir, key):
            shutil.chown(p, "munge", "munge")
        m = self.munge_dir
        self._spawn(
            "munged",
            ["/usr/sbin/munged", "-F", f"--socket={self.munge_socket}",
             f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
             f"--seed-file={m}/munged.seed"],
            m / "munged.log", user="munge",
        )  # fmt: skip
        self._until(lambda: self.munge_socket.exists(), "munged socket", 20, "munged")
        self._start_slurm()

    def _start_slurm(self) -> None:
        log = self.dir / "log"
        self._spawn(
            "slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)], log / "slurmctld.log"
        )
        self._until(lambda: "UP" in self._run("scontrol", "ping").stdout,
                    "slurmctld ping", 30, "slurmctld")  # fmt: skip
        self._spawn(
            "slurmd",
            ["/usr/sbin/slurmd", "-D", "-N", self.host, "-f", str(self.conf)],
            log / "slurmd.log",
        )
        self._until(lambda: self.node().get("State", "").startswith("IDLE"), "node idle", 30,
                    "slurmd")  # fmt: skip

    def restart(self) -> None:
        """Restart slurmctld and slurmd (munged stays), e.g. after slurm.conf changed: what
        ``systemctl restart slurmctld slurmd`` does on a production node."""
        for name in ("slurmd", "slurmctld"):
            proc = self.procs[name]
            proc.terminate()
            proc.wait(timeout=30)
        self._start_slurm()

    def _spawn(self, name: str, argv: list[str], log: Path, user: str | None = None) -> None:
        env = {"PATH": CLIENT_PATH, "LANG": "C.UTF-8", **self.daemon_env, MARKER: str(self.dir)}
        with open(self.dir / "log" / f"{name}.stderr", "wb") as out:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                user=user, group=user, extra_groups=[] if user else None,
                start_new_session=True, cwd="/",
            )  # fmt: skip
        self.logs[name] = log

    def _until(self, ready: Callable[[], bool], what: str, timeout: float, daemon: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[daemon]
            if proc.poll() is not None:
                raise RuntimeError(f"{daemon} exited {proc.returncode} at start:\n"
                                   f"{self._daemon_tail(daemon)}")  # fmt: skip
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what}: not ready in {timeout} s:\n{self._daemon_tail(daemon)}"
                )
            time.sleep(0.1)  # polling with a deadline

    def _daemon_tail(self, name: str) -> str:
        return (
            _tail(self.logs[name]) + "\n-- stderr:\n" + _tail(self.dir / "log" / f"{name}.stderr")
        )

    def _ours(self) -> set[int]:
        """PIDs whose environment carries our marker (daemons, slurmstepd, OCI runtime)."""
        needle = f"{MARKER}={self.dir}".encode()
        return _pids(lambda e: needle in (e / "environ").read_bytes().split(b"\0"))

    def cancel_jobs(self, *filters: str, timeout: float = 60) -> None:
        """scancel the jobs FILTERS select (e.g. ``--user=NAME``) and wait until squeue no
        longer lists them, i.e. their Epilog has run."""
        self._run("scancel", *filters, timeout=10)
        deadline = time.monotonic() + timeout
        while ids := self._run("squeue", "-h", "-o", "%i", *filters, timeout=10).stdout.split():
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {ids} still listed {timeout} s after scancel")
            time.sleep(0.2)  # polling with a deadline

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons by PID (SIGTERM, then SIGKILL); verify all gone."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.cancel_jobs("--partition=" + ",".join(self.partitions))
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        # Anything left escaped Slurm's process tracking (e.g. a child of a job step that
        # outlived the step under proctrack/linuxproc): kill it, then report it.
        if stray := _kill_all(self._ours):
            raise RuntimeError(f"killed processes left behind by the cluster: {sorted(stray)}")

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- clients -------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment for Slurm client commands."""
        return {"PATH": CLIENT_PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf)}

    def _run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip

    def scontrol(self, *args: str) -> str:
        r = self._run("scontrol", *args)
        if r.returncode:
            raise RuntimeError(f"scontrol {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def sbatch(self, script: str, user: str, cwd: Path, *args: str) -> str:
        """Submit SCRIPT (on stdin) as USER from CWD; return the job id."""
        argv = ["sbatch", "--parsable", *args]
        if user != "root":
            argv = ["runuser", "-u", user, "--", *argv]
        r = subprocess.run(argv, input=script, cwd=cwd, env=self.env(), capture_output=True,
                           text=True, timeout=30, check=False)  # fmt: skip
        if r.returncode:
            raise RuntimeError(f"sbatch as {user} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        return parse_fields(self.scontrol("show", "job", "-o", job_id))

    def wait_job(self, job_id: str, states: set[str], timeout: float = 60) -> dict[str, str]:
        """Poll until the job's JobState is one of STATES; return its fields."""
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id)).get("JobState") not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout} s: {job}")
            time.sleep(0.2)  # polling with a deadline
        return job

    def node(self) -> dict[str, str]:
        return parse_fields(self.scontrol("show", "node", "-o", self.host))

    def resume(self, timeout: float = 30) -> dict[str, str]:
        """Return a drained node to service; wait until it shows neither DRAIN nor
        NOT_RESPONDING (seen for ~1 s after a resume)."""
        self.scontrol("update", f"nodename={self.host}", "state=resume")
        deadline = time.monotonic() + timeout
        while {"DRAIN", "NOT_RESPONDING"} & set((node := self.node())["State"].split("+")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node not back in service after {timeout} s: {node}")
            time.sleep(0.2)  # polling with a deadline
        return node

    def jobcomp(self) -> list[str]:
        return self.jobcomp_file.read_text().splitlines() if self.jobcomp_file.exists() else []

    def slurmd_log(self) -> str:
        return (self.dir / "log" / "slurmd.log").read_text(errors="replace")

    @contextlib.contextmanager
    def test_user(self, name: str, uid: int) -> Iterator[HostUser]:
        """An unprivileged host user (own group, home under the cluster dir), removed after."""
        home = self.dir / "home" / name
        r = subprocess.run(["useradd", "-u", str(uid), "-U", "-m", "-d", str(home), "-s",
                            "/bin/sh", name], capture_output=True, text=True, timeout=30,
                           check=False)  # fmt: skip
        if r.returncode:
            raise RuntimeError(f"useradd {name} failed ({r.returncode}): {r.stderr.strip()}")
        try:
            home.chmod(0o755)
            yield HostUser(name, uid, home.stat().st_gid, home)
        except BaseException:
            self._remove_user(name, uid)
            raise
        if leftovers := self._remove_user(name, uid):
            raise RuntimeError(f"processes of {name} outlived their jobs: {sorted(leftovers)}")

    def _remove_user(self, name: str, uid: int) -> set[int]:
        """Cancel the user's jobs, kill what is left of theirs (the uid is new: every process
        it owns was started by this test), delete the user; return the PIDs killed."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.cancel_jobs(f"--user={name}")
        leftovers = _kill_all(lambda: _pids(lambda e: e.stat().st_uid == uid))
        r = subprocess.run(["userdel", "-r", name], capture_output=True, text=True, timeout=30,
                           check=False)  # fmt: skip
        if r.returncode:
            raise RuntimeError(f"userdel {name} failed ({r.returncode}): {r.stderr.strip()}")
        return leftovers
