"""What a batch job asks for, taken from the scheduler's hook arguments and the job script.

Pure functions (no I/O), so each scheduler's format is unit-tested on its own:

- Torque's prologue argv (docs/platform.md, from a real pbs_mom 6.1.3, and Torque's
  "Prologue and epilogue scripts" documentation, argument table): job id, user, group, job
  name, requested resources (``nodes=1:ppn=2,walltime=00:10:00,mem=2gb``), queue, account,
  path of the job script copy. Resource values follow Torque's ``pbs_resources(7B)`` units:
  sizes with ``b``/``kb``/``mb``/``gb``/``tb`` (also ``w`` words of 8 bytes), time as
  ``[[HH:]MM:]SS``.
- ``#VMBATCH key=value`` directive lines in the job script, read like ``#PBS``/``#SBATCH``
  lines: only in the leading comment block (after an optional ``#!`` line; blank lines
  and other comments allowed), before the first command. Keys are an allow-list
  (:data:`DIRECTIVE_KEYS`); an unknown key, a malformed line or a value outside the admin's
  choices is refused with a :class:`~vmbatch.errors.JobError` naming the line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmbatch.errors import JobError

#: Directive keys a user may set (``image``: a catalog name the admin allows; ``vm``:
#: ``yes``/``no``, read by Slurm's ``job_submit.lua`` where the site lets a job choose
#: whether it runs in a VM, ``conf/slurm/vmbatch.lua``; ``keep``: ``yes``/``no``, keep the
#: VM if the job fails, where the admin allows it: ``[batch].user_keep``).
DIRECTIVE_KEYS = frozenset({"image", "vm", "keep"})
_DIRECTIVE = re.compile(rb"#VMBATCH(?:\s+(.*))?")
_KV = re.compile(r"([a-z_]+)=([A-Za-z0-9._-]{1,64})")

_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


@dataclass(frozen=True, slots=True)
class Resources:
    """The job's request as the scheduler granted it (None: not requested)."""

    vcpus: int | None = None
    memory_mib: int | None = None
    walltime: int = 0  # seconds; 0 = no limit


@dataclass(frozen=True, slots=True)
class TorqueJob:
    """Torque prologue arguments 1-8."""

    job_id: str
    user: str
    group: str
    name: str
    resources: Resources
    queue: str
    account: str
    script: str


def torque_size(text: str) -> int:
    """A Torque size (``2gb``, ``512mb``, ``100kb``, ``64w``, ``1000``) in bytes."""
    m = re.fullmatch(r"([0-9]+)([kmgtp]?)(b|w)?", text.strip().lower())
    if m is None:
        raise JobError(f"Torque size {text!r} is not understood", hint="use e.g. mem=2gb")
    word = 8 if m[3] == "w" else 1
    return int(m[1]) * _UNITS[m[2] or "b"] * word


def torque_time(text: str) -> int:
    """A Torque time ``[[HH:]MM:]SS`` (or plain seconds) in seconds."""
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise JobError(f"Torque time {text!r} is not understood", hint="use HH:MM:SS")
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return seconds


def torque_resources(text: str) -> Resources:
    """Cores, memory and walltime from Torque's resource list.

    Cores: ``ppn`` of the first ``nodes=`` entry (``nodes=1:ppn=4``), else ``ncpus``/
    ``procs``; memory: ``mem`` (whole job) else ``pmem`` times the cores; the node's share
    of a multi-node job is not split (one VM per job on this node).
    """
    values: dict[str, str] = {}
    # ``nodes`` may hold ':'-separated properties and '+'-joined node specs; split on ','
    # only where a new ``key=`` starts.
    for item in re.split(r",(?=[A-Za-z_]+=)", text.strip()) if text.strip() else []:
        key, sep, value = item.partition("=")
        if not sep:
            raise JobError(f"Torque resource {item!r} is not key=value")
        values[key.strip().lower()] = value.strip()
    vcpus: int | None = None
    if "nodes" in values:
        ppn = re.search(r":ppn=([0-9]+)", values["nodes"].split("+")[0])
        vcpus = int(ppn[1]) if ppn else 1
    for key in ("ncpus", "procs"):
        if vcpus is None and values.get(key, "").isdigit():
            vcpus = int(values[key])
    memory: int | None = None
    if "mem" in values:
        memory = torque_size(values["mem"])
    elif "pmem" in values:
        memory = torque_size(values["pmem"]) * (vcpus or 1)
    walltime = torque_time(values["walltime"]) if "walltime" in values else 0
    return Resources(
        vcpus=vcpus,
        memory_mib=None if memory is None else -(-memory // (1 << 20)),
        walltime=walltime,
    )


def torque_prologue(argv: Sequence[str]) -> TorqueJob:
    """Parse ``prologue JOBID USER GROUP NAME RESOURCES QUEUE ACCOUNT SCRIPT`` (argv[1:])."""
    args = list(argv[1:])
    if len(args) < 7:
        raise JobError(
            f"Torque prologue: expected 8 arguments (job id, user, group, job name,"
            f" resources, queue, account, script), got {len(args)}",
            hint="configure it as mom_priv/prologue; pbs_mom passes the arguments",
        )
    args += [""] * (8 - len(args))
    return TorqueJob(
        job_id=args[0],
        user=args[1],
        group=args[2],
        name=args[3],
        resources=torque_resources(args[4]),
        queue=args[5],
        account=args[6],
        script=args[7],
    )


def directives(script: bytes) -> dict[str, str]:
    """``#VMBATCH key=value ...`` lines of the script's leading comment block."""
    found: dict[str, str] = {}
    for number, raw in enumerate(script.splitlines()[:1000], start=1):
        line = raw.strip()
        if number == 1 and line.startswith(b"#!"):
            continue
        if line and not line.startswith(b"#"):
            break  # the first command ends the directives, as for #PBS / #SBATCH
        m = _DIRECTIVE.fullmatch(line)
        if m is None:
            continue
        text = (m[1] or b"").decode("ascii", "replace").strip()
        for token in text.split():
            kv = _KV.fullmatch(token)
            if kv is None:
                raise JobError(
                    f"job script line {number}: {token!r} is not key=value",
                    hint="write e.g. '#VMBATCH image=NAME' (letters, digits, '.', '_', '-')",
                )
            if kv[1] not in DIRECTIVE_KEYS:
                raise JobError(
                    f"job script line {number}: unknown #VMBATCH key {kv[1]!r}",
                    hint="known: " + ", ".join(sorted(DIRECTIVE_KEYS)),
                )
            found[kv[1]] = kv[2]
    return found


def choose_image(requested: str | None, default: str, allowed: Sequence[str]) -> str:
    """The image for a job: its own choice if the admin allows it, else the default."""
    if requested is None or requested == default:
        if not default:
            raise JobError(
                "no image: the job names none and the site has no default image",
                hint="add '#VMBATCH image=NAME' to the job script",
            )
        return default
    if requested not in allowed:
        choices = ", ".join(sorted({default, *allowed} - {""})) or "(none)"
        raise JobError(
            f"image {requested!r} is not offered on this site", hint=f"choose one of {choices}"
        )
    return requested


@dataclass(frozen=True, slots=True)
class VmSize:
    """A job's VM: cores, guest RAM (MiB) and what it may use of the host's memory (MiB,
    guest plus QEMU's overhead: its hard limit)."""

    vcpus: int
    memory: int
    host_memory: int


def size_vm(
    want: Resources,
    *,
    default_vcpus: int,
    default_memory: int,
    host_cpus: int,
    host_memory: int,
    reserve_memory: int,
    max_vcpus: int = 0,
    max_memory: int = 0,
    overhead: Callable[[int], int] = lambda _guest: 0,
) -> VmSize:
    """The VM for a job: its request, else the defaults, within limits.

    ``overhead(guest)`` is QEMU's own memory beside a guest of that size
    (:func:`vmbatch.limits.qemu_overhead_mib`). A job granted memory gets a VM that fits
    in the grant, QEMU included: the largest guest whose guest + overhead is within it,
    and the grant is the VM's host memory. Otherwise the guest gets the default and the
    VM that plus the overhead. A request beyond what the node can give (its cores; its
    memory less ``reserve_memory``, the host's own share; the site's ``max_*``) is
    refused, not silently shrunk: the job would not get what the scheduler granted it.
    """
    cpu_cap = min(host_cpus, max_vcpus or host_cpus)
    mem_cap = host_memory - reserve_memory
    vcpus = want.vcpus or min(default_vcpus, cpu_cap)
    if vcpus > cpu_cap:
        raise JobError(
            f"the job asks for {vcpus} cores; a VM on this node can have at most {cpu_cap}",
            hint="request fewer cores per node",
        )
    if want.memory_mib:
        footprint = want.memory_mib
        guest = _fit(footprint, overhead)
    else:
        guest = min(default_memory, max_memory or default_memory)
        if guest + overhead(guest) > mem_cap:
            guest = _fit(mem_cap, overhead)
        footprint = guest + overhead(guest)
    if footprint > mem_cap:
        raise JobError(
            f"the job asks for {footprint} MiB of memory; a VM on this node can have at most"
            f" {mem_cap} MiB",
            hint="request less memory per node",
        )
    if max_memory and guest > max_memory:
        raise JobError(
            f"the job's {footprint} MiB of memory would give its VM {guest} MiB; a VM on"
            f" this node can have at most {max_memory} MiB",
            hint="request less memory per node",
        )
    if guest < 64:
        raise JobError(
            f"the job's {footprint} MiB of memory hold no VM: a VM needs at least 64 MiB for"
            f" its guest and {overhead(64)} MiB for QEMU itself",
            hint=f"request at least {64 + overhead(64)} MiB per node",
        )
    return VmSize(vcpus, guest, footprint)


def _fit(footprint: int, overhead: Callable[[int], int]) -> int:
    """The largest guest whose guest + overhead(guest) is at most ``footprint`` (-1 if none);
    ``overhead`` never decreases as the guest grows."""
    lo, hi = -1, footprint
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid + overhead(mid) <= footprint:
            lo = mid
        else:
            hi = mid - 1
    return lo
