"""Slurm 22.05: what the Prolog/Epilog environment, ``scontrol`` and the OCI bundle say.

Facts relied on (slurm.conf(5) "Prolog and Epilog Scripts", oci.conf(5), measured in
../shared/PLATFORM.md):

- Prolog and Epilog run as root on the node with no arguments and no PATH; the environment
  holds ``SLURM_JOB_ID``, ``SLURM_JOB_USER``, ``SLURM_JOB_UID``, ``SLURM_JOB_GID``,
  ``SLURM_JOB_PARTITION``, ``SLURM_JOB_CPUS_PER_NODE``, ``SLURMD_NODENAME``; the Epilog adds
  ``SLURM_JOB_EXIT_CODE2`` (``exit:signal``). Memory, time limit and name are not there:
  ``scontrol show job`` has them.
- A non-zero Prolog drains the node and requeues the job held; a non-zero Epilog drains it.
  So only node problems may end the Prolog non-zero; job problems are reported by the job
  starter in the job's own output.
- ``oci.conf`` ``RunTimeRun`` runs as the job's user through ``/bin/sh -c``, with slurmd's
  environment and a copy of the bundle as its cwd; the job's argv, environment and working
  directory are in that copy's ``config.json`` (``process.args``, ``process.env``,
  ``process.cwd``), written from the user's request and so treated as untrusted input.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbatch.config import Config
from vmbatch.errors import HostError, JobError
from vmbatch.hooks.request import Resources
from vmbatch.process import run as run_command

log = logging.getLogger(__name__)


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


def job_details(cfg: Config, jid: str, env: Mapping[str, str]) -> tuple[Resources, str]:
    """Memory (MiB), time limit (s) and name of the job, from ``scontrol show job --json``.

    JSON, not ``-o``: the ``key=value`` line holds user-chosen text (job name, comment,
    paths) that could imitate other keys.
    """
    out = scontrol(cfg, "--json", "show", "job", jid, env=env)
    try:
        jobs = json.loads(out).get("jobs") or []
        job: dict[str, Any] = next(j for j in jobs if str(j.get("job_id")) == jid)
    except (ValueError, AttributeError, StopIteration) as exc:
        raise HostError(
            f"scontrol show job {jid} gave no record of the job",
            hint="is slurmctld reachable from the node? (SLURM_CONF)",
        ) from exc
    memory = _memory_mib(job)
    limit = job.get("time_limit")
    walltime = int(limit) * 60 if isinstance(limit, int) and 0 < limit < 2**31 else 0
    name = job.get("name") if isinstance(job.get("name"), str) else ""
    return Resources(None, memory, walltime), str(name)


def _memory_mib(job: Mapping[str, Any]) -> int | None:
    """Memory for this node in MiB: ``memory_per_node``, else per CPU times the CPUs."""
    per_node = job.get("memory_per_node")
    if isinstance(per_node, int) and per_node > 0:
        return per_node
    per_cpu = job.get("memory_per_cpu")
    cpus = job.get("cpus")
    if isinstance(per_cpu, int) and per_cpu > 0 and isinstance(cpus, int) and cpus > 0:
        return per_cpu * cpus
    return None


def batch_script(cfg: Config, jid: str, env: Mapping[str, str]) -> bytes | None:
    """The job's batch script (``scontrol write batch_script ID -``); None for other jobs."""
    try:
        text = scontrol(cfg, "write", "batch_script", jid, "-", env=env)
    except HostError as exc:
        log.info("job %s has no batch script (%s); no #VMBATCH directives", jid, exc)
        return None
    return text.encode("utf-8", "surrogateescape")


def drain(cfg: Config, node: str, reason: str, env: Mapping[str, str]) -> None:
    """Drain this node with ``reason`` (best effort: the Prolog's exit drains it anyway)."""
    clean = re.sub(r"[^\x20-\x7e]", "?", reason)[:200]
    try:
        scontrol(cfg, "update", f"nodename={node}", "state=drain", f"reason={clean}", env=env)
    except HostError as exc:
        log.error("could not drain node %s with the reason (%s)", node, exc)


def exit_status(env: Mapping[str, str]) -> int | None:
    """The job's status from ``SLURM_JOB_EXIT_CODE2`` (``exit:signal``): shell style."""
    m = re.fullmatch(r"([0-9]+):([0-9]+)", env.get("SLURM_JOB_EXIT_CODE2", ""))
    if m is None:
        return None
    return 128 + int(m[2]) if int(m[2]) else int(m[1])


def bundle_process(bundle: Path) -> tuple[tuple[str, ...], dict[str, str], str | None]:
    """``process.args``, ``.env`` and ``.cwd`` of the OCI bundle's ``config.json``."""
    try:
        data = json.loads((bundle / "config.json").read_bytes())
        process = data["process"]
        args = tuple(str(a) for a in process["args"])
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
