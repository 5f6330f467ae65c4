"""Slurm 22.05: what the Prolog/Epilog environment, ``scontrol`` and the OCI bundle say.

Facts relied on (slurm.conf(5) "Prolog and Epilog Scripts", oci.conf(5), measured in
docs/platform.md):

- Prolog and Epilog run as root on the node with no arguments and no PATH; the environment
  holds ``SLURM_JOB_ID``, ``SLURM_JOB_USER``, ``SLURM_JOB_UID``, ``SLURM_JOB_GID``,
  ``SLURM_JOB_PARTITION``, ``SLURM_JOB_CPUS_PER_NODE``, ``SLURMD_NODENAME``; the Epilog adds
  ``SLURM_JOB_EXIT_CODE2`` (``exit:signal``), which is not final for a cancelled job
  (:func:`job_end`). Memory, time limit and name are not there:
  ``squeue`` has them (see :func:`job_details`); ``scontrol write batch_script ID -``
  prints the job script (measured in a 22.05 Prolog).
- A non-zero Prolog drains the node and requeues the job held; a non-zero Epilog drains it.
  So only node problems may end the Prolog non-zero; job problems are reported by the job
  starter in the job's own output.
- ``oci.conf`` ``RunTimeRun`` runs as the job's user through ``/bin/sh -c``, with slurmd's
  environment and a copy of the bundle as its cwd; the job's argv, environment and working
  directory are in that copy's ``config.json`` (``process.args``, ``process.env``,
  the batch script is bind-mounted, ``mounts``; 22.05 writes no ``process.cwd``, so the
  Prolog's ``SLURM_JOB_WORK_DIR`` goes to the starter), written from the user's
  request and so treated as untrusted input. ``exec`` in RunTimeRun makes the starter the
  step's process, so a cancelled job's status is the starter's (143 after SIGTERM).
- Job steps (``srun``, ``salloc``'s steps, the interactive step) reach ``RunTimeRun`` only
  when the step itself names a container: 22.05 copies the job's container to the batch
  step alone (``build_batch_step``), a step's comes from ``srun --container`` /
  ``SRUN_CONTAINER``. ``conf/slurm/cli_filter.lua`` sets it for every ``srun``. ``%s`` is
  the step id: a number, or 0xfffffffb for the batch step and 0xfffffffa for the
  interactive step (slurm.h). slurmstepd runs a container step with one task per node
  (more fail with "Task launch ... Unspecified error", measured), execs ``RunTimeRun`` in
  the task with the task's stdio (the pseudo-terminal with ``--pty``), and writes no
  working directory for the step (its ``cwd`` becomes the bundle copy).
- All four of RunTimeRun/Query/Kill/Delete must be set; RunTimeQuery must print the OCI
  state JSON (``{"ociVersion", "id", "status", "pid", "bundle"}``) or the step fails with
  status 123 ("RunTimeQuery failed rc:0 output:").
- The CPUs allocated to a job on a node are in ``scontrol show job -d``'s detail lines,
  ``Nodes=HOSTLIST CPU_IDs=LIST Mem=MiB GRES=...`` (``slurm_sprint_job_info``, src/api/
  job_info.c), as Slurm's abstract ids (:func:`vmbatch.limits.slurm_to_os`). The job's
  task/cgroup cpuset does not exist yet when the Prolog runs: slurmd runs the Prolog
  before it starts any slurmstepd (``_rpc_prolog`` in src/slurmd/slurmd/req.c: the
  Prolog, then with ``PrologFlags=Contain`` the extern step, whose slurmstepd makes the
  job's cgroup, ``<mount>/cpuset/slurm/uid_U/job_J`` on cgroup v1 and
  ``<mount>/system.slice/slurmstepd.scope/job_J`` on v2); that cpuset is made from the
  same allocation with the same abstract-to-OS mapping.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from vmbatch.config import Config
from vmbatch.errors import HostError, JobError
from vmbatch.hooks.accounting import JobEnd
from vmbatch.hooks.request import Resources
from vmbatch.limits import parse_cpu_list
from vmbatch.process import run as run_command

log = logging.getLogger(__name__)

#: ``%s`` of the batch step and of ``salloc``'s interactive step (slurm.h, 22.05).
BATCH_STEP = str(0xFFFFFFFB)
INTERACTIVE_STEP = str(0xFFFFFFFA)


def step_name(step_id: str) -> str | None:
    """oci.conf's ``%s`` as vmbatch names the step: None for the batch step (and for an
    oci.conf that passes no ``%s``), ``interactive``, or the step number."""
    if step_id in ("", BATCH_STEP):
        return None
    if step_id == INTERACTIVE_STEP:
        return "interactive"
    if not step_id.isdigit() or len(step_id) > 10:
        raise HostError(
            f"oci.conf passed {step_id[:40]!r} as the step id",
            hint="RunTimeRun must end with '%j %b %s' (conf/slurm/oci.conf)",
        )
    return str(int(step_id))


def step_of_bundle(bundle: Path) -> str:
    """The step id from the name of slurmstepd's bundle copy, ``oci-job<id>-<step>``
    (``container.c``: ``_generate_bundle_path``), for an oci.conf whose RunTimeRun passes
    no ``%s``: else every step of a job would share the batch script's guest directory."""
    m = re.fullmatch(r"oci-job\d+-(\d+|batch|interactive)", bundle.name)
    if m is None:
        return ""
    return {"batch": BATCH_STEP, "interactive": INTERACTIVE_STEP}.get(m.group(1), m.group(1))


def step_program(args: tuple[str, ...], cwd: str | None) -> tuple[bytes | None, tuple[str, ...]]:
    """What a step (``srun ARGS``) runs in the VM: ``(script, args)`` where a script file
    named with a path is sent by content, like the batch script (the VM may not see the
    node's files); ``(None, args)``: run ``args`` as a command in the VM, found on the
    guest's PATH (srun resolves nothing unless ``--test-only``/``LaunchParameters=test_exec``).
    Read as the job's user: only files the user can read."""
    first = args[0]
    if "/" in first:
        path = Path(first) if first.startswith("/") or cwd is None else Path(cwd) / first
        try:
            with path.open("rb") as f:
                head = f.read(2)
                if head == b"#!" and path.is_file():
                    return head + f.read(), args[1:]
        except OSError:
            pass  # not on the node: perhaps in the VM; the guest says if it is not
    return None, args


#: Where Slurm's clients find slurm.conf when ``SLURM_CONF`` is not set: the usual file, and
#: the copy slurmd caches on a "configless" node (https://slurm.schedmd.com/configless_slurm.html).
DEFAULT_CONFS = (Path("/etc/slurm/slurm.conf"), Path("/run/slurm/conf/slurm.conf"))


def config_present(env: Mapping[str, str]) -> bool:
    """Whether Slurm's clients would find a slurm.conf. Without one they look up DNS SRV
    records (configless Slurm): vmbatch never sends such a query where no Slurm is set up."""
    named = env.get("SLURM_CONF")
    if named:
        return Path(named).is_file()
    return any(p.is_file() for p in DEFAULT_CONFS)


def _env(env: Mapping[str, str], key: str) -> str:
    value = env.get(key, "")
    if not value:
        raise JobError(
            f"Slurm Prolog/Epilog environment lacks {key}",
            hint="run vmbatch-prologue/-epilogue as slurm.conf's Prolog/Epilog (slurmd sets it)",
        )
    return value


def job_id(env: Mapping[str, str]) -> str:
    return _env(env, "SLURM_JOB_ID")


def user(env: Mapping[str, str]) -> str:
    return _env(env, "SLURM_JOB_USER")


def cpus_on_node(text: str) -> int | None:
    """This node's cores from ``SLURM_JOB_CPUS_PER_NODE`` (``4``, ``4(x2)``, ``4(x2),2``).

    Prolog runs on each node of the job; the first group is the batch host's (one VM per job
    on this node).
    """
    m = re.match(r"\s*([0-9]+)", text)
    return int(m[1]) if m else None


def scontrol(cfg: Config, *args: str, env: Mapping[str, str]) -> str:
    """Run scontrol with the hook's ``SLURM_CONF`` (slurmd passes its own)."""
    client = {k: env[k] for k in ("SLURM_CONF",) if env.get(k)}
    return run_command(
        [str(cfg.tools.scontrol), *args], timeout=cfg.tools.command_timeout, env=client
    ).stdout


def job_container(cfg: Config, jid: str, env: Mapping[str, str]) -> str:
    """The job's container as slurmctld has it ("" if none), from ``squeue -O Container:``.

    This is the mark ``job_submit.lua`` (``conf/slurm/vmbatch.lua``) leaves on every job
    that runs in a VM: the scope is decided there, once, and the node follows it. squeue
    prints exactly this one field, unpadded (``-O NAME:`` with no width: no truncation,
    ``_parse_long_token`` in src/squeue/opts.c); a container the user chose may hold any
    text, so only the final line break is removed and the rest compared as it is. A job
    squeue does not list is a HostError, like :func:`job_details`'s."""
    client = {k: env[k] for k in ("SLURM_CONF",) if env.get(k)}
    out = run_command(
        [str(cfg.tools.squeue), "-h", "-t", "all", "-j", jid, "-O", "Container:"],
        timeout=cfg.tools.command_timeout,
        env=client,
    ).stdout
    if not out:
        raise HostError(
            f"squeue gave no record of job {jid}",
            hint="is slurmctld reachable from the node? (SLURM_CONF)",
        )
    return out.removesuffix("\n")


def is_vmbatch_job(cfg: Config, jid: str, env: Mapping[str, str]) -> bool:
    """Does job ``jid`` run in a VM, i.e. did ``job_submit.lua`` give it ``[slurm].bundle``?
    Asked by the Prolog as root, from slurmctld: never from the job's environment."""
    return job_container(cfg, jid, env) == str(cfg.slurm.bundle)


def job_details(cfg: Config, jid: str, env: Mapping[str, str]) -> tuple[Resources, str]:
    """Allocated memory (MiB), time limit (s) and name of the job, from ``squeue -O``.

    ``scontrol show job -o`` holds user-chosen text (job name, comment, paths) that could
    imitate its other ``key=value`` fields, and 22.05's scontrol has no JSON output; so
    squeue prints exactly three '|'-separated fields with the name, the only free text,
    last. ``tres-alloc`` (``cpu=2,mem=1000M,node=1,billing=2``) is what slurmctld allocated,
    whether the job asked ``--mem`` or ``--mem-per-cpu``.
    """
    client = {k: env[k] for k in ("SLURM_CONF",) if env.get(k)}
    out = run_command(
        [str(cfg.tools.squeue), "-h", "-j", jid, "-O", "tres-alloc:|,TimeLimit:|,Name:"],
        timeout=cfg.tools.command_timeout,
        env=client,
    ).stdout
    parts = out.rstrip("\n").split("|", 2)
    if len(parts) != 3:
        raise HostError(
            f"squeue gave no record of job {jid} ({out.strip()[:80]!r})",
            hint="is slurmctld reachable from the node? (SLURM_CONF)",
        )
    tres, limit, name = parts
    return Resources(None, tres_memory_mib(tres), slurm_time(limit)), name.strip()


def tres_memory_mib(tres: str) -> int | None:
    """The memory of one node's share of a TRES list (``cpu=2,mem=1000M,node=1``) in MiB.

    ``mem=`` is the whole job's (``--mem`` is per node: a two-node ``--mem=4G`` job shows
    ``mem=8G,node=2``), so it is divided by ``node=``; with ``--mem-per-cpu`` and CPUs
    spread unevenly over the nodes this is the even share."""
    m = re.search(r"(?:^|,)mem=([0-9.]+)([KMGTP]?)", tres.strip())
    if m is None:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}[m[2]]
    n = re.search(r"(?:^|,)node=([0-9]+)(?:,|$)", tres.strip())
    nodes = max(1, int(n[1])) if n else 1
    return max(1, int(float(m[1]) * scale / nodes))


#: A detail line of ``scontrol show job -d``: two spaces after the record's three.
_DETAIL = re.compile(r"^     Nodes=(\S+) CPU_IDs=(\S+) Mem=[0-9]+ GRES=", re.M)


def job_cpu_ids(cfg: Config, jid: str, node: str, env: Mapping[str, str]) -> frozenset[int] | None:
    """Slurm's abstract ids of the CPUs job ``jid`` has on ``node``; None if none named."""
    return parse_cpu_ids(scontrol(cfg, "show", "job", "-d", jid, env=env), node)


def parse_cpu_ids(text: str, node: str) -> frozenset[int] | None:
    """``CPU_IDs=`` of the detail lines naming ``node`` in ``scontrol show job -d``.

    The record also holds text the job's owner chose (job name, working directory, output
    paths, comment), which may contain line breaks and so imitate a detail line (seen:
    ``sbatch -J $'x\\n     Nodes=NODE CPU_IDs=0-99 ...'``). Every line naming the node
    must therefore agree; if they do not, the job is refused rather than pinned where its
    owner chose.
    """
    found: set[frozenset[int]] = set()
    for hosts, ids in _DETAIL.findall(text):
        try:
            if node not in expand_hostlist(hosts):
                continue
            found.add(parse_cpu_list(ids))
        except ValueError:
            found.add(frozenset({-1}))  # unreadable: disagrees with the real line
    if len(found) > 1:
        raise JobError(
            f"the job's record names node {node} with {len(found)} different CPU sets;"
            " its name, comment or paths imitate scontrol's output, so vmbatch cannot tell"
            " which CPUs Slurm allocated",
            hint="use a job name, comment and paths without line breaks",
        )
    return next(iter(found), None)


_HOSTLIST_ITEM = re.compile(r"([^\[\],]*)\[([0-9,-]+)\]")
_MAX_HOSTS = 100_000


def expand_hostlist(expr: str) -> list[str]:
    """Slurm's hostlist notation (``n[01-03,7],login``) as names; ValueError if malformed.

    Covers what ``hostlist_ranged_string`` prints for a job's nodes: comma-separated
    items, each a prefix, then optionally bracketed ranges (zero-padded as written) and a
    suffix, repeated (``rack[1-2]n[1-4]``).
    """
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"not a host list: {expr[:80]!r}")
        if ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    items.append(expr[start:])
    names: list[str] = []
    for item in items:
        expanded = [""]
        pos = 0
        for m in _HOSTLIST_ITEM.finditer(item):
            if m.start() != pos:
                raise ValueError(f"not a host list: {expr[:80]!r}")
            numbers: list[str] = []
            for part in m[2].split(","):
                lo, _, hi = part.partition("-")
                if not lo.isdigit() or (hi and not hi.isdigit()) or int(hi or lo) < int(lo):
                    raise ValueError(f"not a host range: {part!r}")
                # Counted before anything is built: the text may be the job owner's (a
                # job name imitating a detail line), and n[0-99999999999] must not make
                # root's Prolog build a list until it is killed.
                count = int(hi or lo) - int(lo) + 1
                if len(numbers) + count > _MAX_HOSTS:
                    raise ValueError(f"host list too long: {expr[:80]!r}")
                width = len(lo) if lo.startswith("0") else 0
                numbers += [f"{n:0{width}d}" for n in range(int(lo), int(hi or lo) + 1)]
            if len(names) + len(expanded) * len(numbers) > _MAX_HOSTS:
                raise ValueError(f"host list too long: {expr[:80]!r}")
            expanded = [e + m[1] + n for e in expanded for n in numbers]
            pos = m.end()
        rest = item[pos:]
        if (not rest and pos == 0) or "[" in rest or "]" in rest:
            raise ValueError(f"not a host list: {expr[:80]!r}")
        names += [e + rest for e in expanded]
    return names


def slurm_time(text: str) -> int:
    """Seconds of a Slurm time (``M:SS``, ``H:MM:SS``, ``D-HH:MM:SS``); 0 if unlimited."""
    m = re.fullmatch(r"(?:([0-9]+)-)?(?:([0-9]+):)?([0-9]+):([0-9]+)", text.strip())
    if m is None:
        return 0  # UNLIMITED, NOT_SET, INVALID
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def batch_script(cfg: Config, jid: str, env: Mapping[str, str]) -> bytes | None:
    """The job's batch script (``scontrol write batch_script ID -``); None for other jobs."""
    try:
        text = scontrol(cfg, "write", "batch_script", jid, "-", env=env)
    except HostError as exc:
        log.info("job %s has no batch script (%s); no #VMBATCH directives", jid, exc)
        return None
    return text.encode("utf-8", "surrogateescape")


def drain(cfg: Config, node: str, reason: str, env: Mapping[str, str]) -> str | None:
    """Drain this node with ``reason`` (best effort: the Prolog's exit drains it anyway);
    the reason as set, or None if scontrol failed."""
    clean = re.sub(r"[^\x20-\x7e]", "?", reason)[:200].strip()
    try:
        scontrol(cfg, "update", f"nodename={node}", "state=drain", f"reason={clean}", env=env)
    except HostError as exc:
        log.error("could not drain node %s with the reason (%s)", node, exc)
        return None
    return clean


def drained_by(cfg: Config, node: str, reason: str, env: Mapping[str, str]) -> bool | None:
    """Is ``node`` drained with exactly ``reason``? None: the node is not drained at all.

    ``scontrol show node -o`` prints ``State=IDLE+DRAIN`` and ``Reason=TEXT [user@time]``.
    """
    out = scontrol(cfg, "show", "node", node, "-o", env=env)
    state = re.search(r"(?:^|\s)State=(\S+)", out)
    if state is None or "DRAIN" not in state[1]:
        return None
    return f" Reason={reason} [" in out or out.rstrip().endswith(f" Reason={reason}")


def resume(cfg: Config, node: str, env: Mapping[str, str]) -> None:
    """``scontrol update nodename=NODE state=resume``."""
    scontrol(cfg, "update", f"nodename={node}", "state=resume", env=env)


def epilog_end(env: Mapping[str, str]) -> JobEnd | None:
    """The job's end as the Epilog's environment has it (``prep_script_slurmd.c``):
    ``SLURM_JOB_EXIT_CODE2`` (``exit:signal``), set when slurmctld sent the kill message:
    for a job cancelled while it ran, before the job's own status was known (``0:0``);
    :func:`job_end` asks slurmctld instead. ``SLURM_JOB_RESTART_COUNT``, from the kill
    message's credential: a requeue that ends this run is already counted in it."""
    m = re.fullmatch(r"([0-9]+):([0-9]+)", env.get("SLURM_JOB_EXIT_CODE2", ""))
    if m is None:
        return None
    count = env.get("SLURM_JOB_RESTART_COUNT", "")
    restarts = int(count) if count.isdigit() and len(count) < 10 else None
    return JobEnd(int(m[1]), int(m[2]), "epilog environment", restarts=restarts)


def decode_exit_code(raw: int) -> tuple[int, int]:
    """slurmctld's ``exit_code`` (a wait status) as ``scontrol show job`` prints
    ``ExitCode=STATUS:SIGNAL`` (src/api/job_info.c: ``WTERMSIG`` if ``WIFSIGNALED``, else
    ``WEXITSTATUS`` if ``WIFEXITED``, else both 0)."""
    if os.WIFSIGNALED(raw):
        return 0, os.WTERMSIG(raw)
    if os.WIFEXITED(raw):
        return os.WEXITSTATUS(raw), 0
    return 0, 0


_END_FIELDS = "exit_code:|,EndTime:|,RestartCnt:|,Reason:"


def job_end(cfg: Config, jid: str, env: Mapping[str, str]) -> JobEnd:
    """How slurmctld says the job ended, asked by the Epilog (the job is still known:
    COMPLETING): ``squeue -O exit_code,EndTime,RestartCnt,Reason``. ``exit_code`` is the raw
    wait status (``_print_job_exit_code`` in src/squeue/print.c), decoded by
    :func:`decode_exit_code`; ``EndTime`` is local time (``%Y-%m-%dT%H:%M:%S`` without
    ``SLURM_TIME_FORMAT``); ``RestartCnt`` is how often the job was requeued, already
    counted for a requeue that ends this run (``_print_job_restart_cnt``); ``Reason`` comes
    last (it may hold free text). A HostError if slurmctld gives no record of the job."""
    client = {k: env[k] for k in ("SLURM_CONF",) if env.get(k)}
    out = run_command(
        [str(cfg.tools.squeue), "-h", "-t", "all", "-j", jid, "-O", _END_FIELDS],
        timeout=cfg.tools.command_timeout,
        env=client,
    ).stdout
    parts = out.rstrip("\n").split("|", 3)
    if len(parts) != 4 or not re.fullmatch(r"-?[0-9]+", parts[0].strip()):
        raise HostError(
            f"squeue gave no exit code of job {jid} ({out.strip()[:80]!r})",
            hint="is slurmctld reachable from the node? (SLURM_CONF)",
        )
    status, signal = decode_exit_code(int(parts[0].strip()) & 0xFFFFFFFF)
    try:
        end: float | None = time.mktime(time.strptime(parts[1].strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        end = None  # Unknown, N/A, None
    restarts = int(parts[2]) if parts[2].strip().isdigit() else None
    return JobEnd(status, signal, "slurmctld", end, parts[3].strip() or None, restarts=restarts)


def bundle_process(bundle: Path) -> tuple[tuple[str, ...], dict[str, str], str | None]:
    """``process.args``, ``.env`` and ``.cwd`` of the OCI bundle's ``config.json``."""
    try:
        data = json.loads((bundle / "config.json").read_bytes())
        process = data["process"]
        args = tuple(str(a) for a in process["args"])
        # slurmstepd bind-mounts the batch script into the container (a ``mounts`` entry,
        # destination /tmp/slurm/startup) and names the destination in ``args``: map it back.
        for mount in data.get("mounts") or []:
            if args and isinstance(mount, dict) and mount.get("destination") == args[0]:
                args = (str(mount.get("source", args[0])), *args[1:])
        env: dict[str, str] = {}
        for item in process.get("env") or []:
            key, sep, value = str(item).partition("=")
            if sep and key:
                env[key] = value
        cwd = process.get("cwd")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HostError(
            f"cannot read the job from the OCI bundle {bundle}/config.json: {exc}",
            hint="vmbatch-starter must be oci.conf's RunTimeRun (see docs/admin-slurm.md)",
        ) from exc
    if not args:
        raise HostError(f"{bundle}/config.json names no program for the job")
    return args, env, cwd if isinstance(cwd, str) and cwd.startswith("/") else None


def oci_state(job_id: str, bundle: str) -> str:
    """RunTimeQuery's answer (OCI runtime spec, "State"): vmbatch keeps no container
    process of its own, the job starter is the step's process, so always ``stopped``."""
    return json.dumps(
        {
            "ociVersion": "1.0.2",
            "id": f"vmbatch-{job_id}",
            "status": "stopped",
            "pid": 0,
            "bundle": bundle,
        }
    )
