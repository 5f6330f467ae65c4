"""``vmbatch report``: a summary of the accounting log (``[batch].accounting_log``).

Reads the JSON lines the batch epilogue writes (:mod:`vmbatch.hooks.accounting`), of every
format so far: lines without ``format`` (1) have no ``script_ran``, ``exit_signal`` or
``exit_source`` (their ``exit_status`` was 128+N after signal N, kept as it is; their
script counts as run if they have a ``run_seconds`` and no ``cause``); a missing key counts
as unknown. A line that is not a JSON object (the last one cut short by a full disk or a
crash; anything else) is skipped and counted. ``.gz`` files (logrotate's ``compress``) are
read through gzip.

A job **failed** if its script did not run (``script_ran`` false, or a format-1 line with a
``cause``), or if the scheduler reports a non-zero exit status or a signal. Its cause, for
"failures by cause", is the line's ``cause`` up to the first ``:`` when that names an error
class (``GuestBootTimeoutError``), else the whole cause (``cancelled during boot``), else
``exit status N`` / ``signal N``. Percentiles are nearest-rank: the smallest value with at
least that share of the values at or below it.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

#: ``2h``, ``30m``, ``7d``, ``1w``, ``90s``: that long before now.
_AGO = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ERROR_CLASS = re.compile(r"[A-Z][A-Za-z0-9]*Error")


def parse_when(text: str, now: float) -> float:
    """A point in time as ``--since``/``--until`` take it: ``now``, a duration before now
    (``90s``, ``30m``, ``2h``, ``7d``, ``1w``), ``@EPOCH``, or an ISO 8601 date or time
    (``2026-11-30``, ``2026-11-30T09:00``, with an offset or in local time). ValueError if
    none of these."""
    value = text.strip()
    if value == "now":
        return now
    if m := _AGO.fullmatch(value):
        return now - float(m[1]) * _UNIT[m[2]]
    try:
        if value.startswith("@"):
            return float(value[1:])
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use now, 30m, 2h, 7d, 1w, @EPOCH or an ISO date"
            " (2026-11-30, 2026-11-30T09:00)"
        ) from None


@dataclass(frozen=True, slots=True)
class Job:
    """One accounting line, with the defaults of older formats filled in."""

    time: float | None
    job_id: str
    user: str
    image: str
    boot_seconds: float | None
    run_seconds: float | None
    script_ran: bool | None
    exit_status: int | None
    exit_signal: int | None
    cause: str | None
    qemu_cpu_seconds: float | None

    @property
    def failure(self) -> str | None:
        """Why the job failed (the key of "failures by cause"), or None if it did not."""
        if self.cause and self.script_ran is not True:
            head = self.cause.partition(":")[0].strip()
            return head if _ERROR_CLASS.fullmatch(head) else self.cause
        if self.exit_signal:
            return f"signal {self.exit_signal}"
        if self.exit_status:
            return f"exit status {self.exit_status}"
        if self.script_ran is False:
            return "script did not run"
        return None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: object, unknown: str) -> str:
    return value if isinstance(value, str) and value else unknown


def job_of(raw: dict[str, Any]) -> Job:
    """One line as a :class:`Job` (any format; unknown values are None)."""
    run = _number(raw.get("run_seconds"))
    ran = raw.get("script_ran")
    status, signal = _integer(raw.get("exit_status")), _integer(raw.get("exit_signal"))
    cause = raw.get("cause") if isinstance(raw.get("cause"), str) else None
    if "format" not in raw:  # format 1: no script_ran (its exit_status is kept as it is)
        ran = True if run is not None and cause is None else (False if cause else None)
    return Job(
        time=_number(raw.get("time")),
        job_id=_text(raw.get("job_id"), "?"),
        user=_text(raw.get("user"), "(unknown)"),
        image=_text(raw.get("image"), "(none)"),
        boot_seconds=_number(raw.get("boot_seconds")),
        run_seconds=run if ran is not False else None,
        script_ran=ran if isinstance(ran, bool) else None,
        exit_status=status,
        exit_signal=signal,
        cause=cause,
        qemu_cpu_seconds=_number(raw.get("qemu_cpu_seconds")),
    )


@dataclass
class Records:
    """The jobs read, and how many lines were skipped."""

    jobs: list[Job] = field(default_factory=list)
    skipped: int = 0


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]  # a binary file
    return path.open("rb")


def _lines(fh: IO[bytes]) -> Iterator[bytes]:
    try:
        yield from fh
    except (EOFError, gzip.BadGzipFile):
        return  # a compressed file cut short: what was read counts


def read(paths: Iterable[Path], since: float | None = None, until: float | None = None) -> Records:
    """The jobs of the accounting files with ``since <= time < until``; OSError if a file
    cannot be read (missing, not allowed: the log is root's, mode 0640)."""
    records = Records()
    for path in paths:
        with _open(path) as fh:
            for raw_line in _lines(fh):
                if not raw_line.strip():
                    continue
                try:
                    raw = json.loads(raw_line)
                except ValueError:
                    records.skipped += 1
                    continue
                if not isinstance(raw, dict):
                    records.skipped += 1
                    continue
                job = job_of(raw)
                if since is not None and (job.time is None or job.time < since):
                    continue
                if until is not None and (job.time is None or job.time >= until):
                    continue
                records.jobs.append(job)
    return records


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile ``p`` (0 < p <= 100) of ``values``; None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _group(jobs: list[Job]) -> dict[str, Any]:
    boots = [j.boot_seconds for j in jobs if j.boot_seconds is not None]
    runs = [j.run_seconds for j in jobs if j.run_seconds is not None]
    cpu = [j.qemu_cpu_seconds for j in jobs if j.qemu_cpu_seconds is not None]
    return {
        "jobs": len(jobs),
        "failed": sum(1 for j in jobs if j.failure is not None),
        "boot_mean": round(statistics.fmean(boots), 3) if boots else None,
        "boot_median": round(statistics.median(boots), 3) if boots else None,
        "run_seconds_total": round(sum(runs), 3),
        "qemu_cpu_seconds_total": round(sum(cpu), 3),
    }


def summarise(records: Records) -> dict[str, Any]:
    """The report as a dict (what ``--json`` prints)."""
    jobs = records.jobs
    boots = [j.boot_seconds for j in jobs if j.boot_seconds is not None]
    times = [j.time for j in jobs if j.time is not None]
    causes = Counter(f for j in jobs if (f := j.failure) is not None)
    by_image: dict[str, list[Job]] = {}
    by_user: dict[str, list[Job]] = {}
    for j in jobs:
        by_image.setdefault(j.image, []).append(j)
        by_user.setdefault(j.user, []).append(j)
    return {
        "jobs": len(jobs),
        "failed": sum(causes.values()),
        "script_ran": sum(1 for j in jobs if j.script_ran),
        "skipped_lines": records.skipped,
        "first": min(times) if times else None,
        "last": max(times) if times else None,
        "failures_by_cause": dict(sorted(causes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "boot_seconds": {
            "count": len(boots),
            "p50": percentile(boots, 50),
            "p90": percentile(boots, 90),
            "p99": percentile(boots, 99),
            "max": max(boots) if boots else None,
        },
        "images": {name: _group(js) for name, js in sorted(by_image.items())},
        "users": {name: _group(js) for name, js in sorted(by_user.items())},
    }


def _f(value: object, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _stamp(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")


def render(summary: dict[str, Any], sources: list[str]) -> str:
    """The report as text."""
    out = [
        f"accounting: {', '.join(sources)}",
        f"jobs: {summary['jobs']}  failed: {summary['failed']}  script ran:"
        f" {summary['script_ran']}  ({_stamp(summary['first'])} to {_stamp(summary['last'])})",
    ]
    if summary["skipped_lines"]:
        out.append(f"skipped: {summary['skipped_lines']} unreadable line(s)")
    boot = summary["boot_seconds"]
    out.append(
        f"boot seconds: p50 {_f(boot['p50'])}  p90 {_f(boot['p90'])}  p99 {_f(boot['p99'])}"
        f"  max {_f(boot['max'])}  (n={boot['count']})"
    )
    if summary["failures_by_cause"]:
        out.append("failures by cause:")
        out += [f"  {n:5d}  {cause}" for cause, n in summary["failures_by_cause"].items()]
    for title, key in (("image", "images"), ("user", "users")):
        groups = summary[key]
        if not groups:
            continue
        width = max(len(title), *(len(name) for name in groups))
        out.append("")
        out.append(
            f"{title.upper():{width}}  {'JOBS':>5} {'FAILED':>6} {'BOOT-MEAN':>9}"
            f" {'BOOT-MEDIAN':>11} {'RUN-TOTAL-S':>11} {'QEMU-CPU-S':>10}"
        )
        for name, g in groups.items():
            out.append(
                f"{name:{width}}  {g['jobs']:5d} {g['failed']:6d} {_f(g['boot_mean']):>9}"
                f" {_f(g['boot_median']):>11} {_f(g['run_seconds_total']):>11}"
                f" {_f(g['qemu_cpu_seconds_total']):>10}"
            )
    return "\n".join(out) + "\n"
