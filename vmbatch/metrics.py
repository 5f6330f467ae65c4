"""Prometheus metrics of this node, as a text file for node_exporter's textfile collector.

Outside contracts:

- The Prometheus text exposition format (``# HELP``, ``# TYPE``, ``name{label="v"} value``;
  histograms as cumulative ``_bucket{le=...}`` series plus ``_sum`` and ``_count``),
  https://prometheus.io/docs/instrumenting/exposition_formats/, and its naming rules
  (a ``vmbatch_`` prefix, base units in the name, ``_total`` on counters),
  https://prometheus.io/docs/practices/naming/. The tests parse the file with
  ``prometheus_client.parser.text_string_to_metric_families``.
- node_exporter's textfile collector reads every ``*.prom`` file of one directory on each
  scrape; a file is replaced by writing a temporary file in that directory and renaming
  it over the old one, so a scrape never sees half a file (node_exporter's
  README.textfile, shipped by Debian's ``prometheus-node-exporter``; that package's
  ``--collector.textfile.directory`` defaults to ``/var/lib/prometheus/node-exporter``, the
  default of ``[metrics].textfile``). The file is mode 0644: node_exporter runs as its own
  user (``prometheus`` on Debian). It holds counts, sizes and durations, never a job's
  user, name, key or message.

Counters outlive the short hook processes that move them: they are kept in
``[batch].state_dir/node/metrics.json`` (root only, replaced atomically, so a crash leaves
the old or the new state), changed under an exclusive ``flock`` of ``metrics.lock`` beside
it, so two epilogues finishing at once both count. The text file is rendered from that
state under the same lock, so a slower writer cannot put an older view over a newer one.
Gauges (cache size, job VMs, the node's drain) are measured while rendering.

Only root's processes count (the state is root's); in anyone else's process every call
here does nothing. No call here raises: a metrics failure is a logged warning, never a
failed hook.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmbatch.config import Config
from vmbatch.state import atomic_write

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]

#: Upper bounds (seconds) of the boot-duration histogram: fast test guests boot in ~3 s
#: under TCG, cloud images in 10-60 s (docs/platform.md), slow ones up to
#: [vm].boot_timeout (180 s by default).
BOOT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0)

#: A failure's cause class: the name of one of vmbatch's exception classes. Anything else
#: in the accounting record's ``cause`` counts as "other", so the label's values stay few.
_CAUSE_CLASS = re.compile(r"[A-Z][A-Za-z0-9]{0,63}Error")
#: Causes of a job whose script never ran that are not an error class
#: (:func:`vmbatch.hooks.accounting.why_not_run`), by their fixed beginning -> label.
_NOT_RUN = (
    ("cancelled during boot", "cancelled_during_boot"),
    ("time limit reached during boot", "timelimit_during_boot"),
    ("no prologue state", "no_prologue"),
    ("the prologue ended before the VM was ready", "prologue_killed"),
    ("the job starter did not start the script", "starter_failed"),
    ("the scheduler did not start the job", "not_started"),
    ("the job ended before its script started", "ended_before_start"),
)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()


STARTED = Metric(
    "vmbatch_jobs_started_total",
    "counter",
    "Batch jobs whose vmbatch prologue began to prepare a VM on this node.",
)
FINISHED = Metric(
    "vmbatch_jobs_finished_total",
    "counter",
    "Batch jobs whose vmbatch epilogue ended them, by outcome (succeeded: exit status 0"
    " and no vmbatch failure) and cause (the vmbatch error class, exit_nonzero, signal,"
    " unknown; none for succeeded).",
    ("outcome", "cause"),
)
BOOT = Metric(
    "vmbatch_boot_duration_seconds",
    "histogram",
    "Seconds from the prologue's start to the job's VM answering SSH.",
)
DOWNLOAD = Metric(
    "vmbatch_image_download_bytes_total",
    "counter",
    "Bytes of images received from their sources (http(s) downloads and file:// copies).",
)
HITS = Metric(
    "vmbatch_image_cache_hits_total",
    "counter",
    "Image look-ups served from the node's cache.",
)
MISSES = Metric(
    "vmbatch_image_cache_misses_total",
    "counter",
    "Image look-ups that found no usable cached copy (fetched, refreshed, or waited for"
    " another process's fetch).",
)
CACHE_SIZE = Metric(
    "vmbatch_image_cache_size_bytes",
    "gauge",
    "Bytes of the images in the node's image cache.",
)
CACHE_LIMIT = Metric(
    "vmbatch_image_cache_limit_bytes",
    "gauge",
    "The image cache's cap, [cache].max_size_gib in bytes (0: no cap).",
)
RESTARTS = Metric(
    "vmbatch_libvirtd_restarts_total",
    "counter",
    "Restarts of libvirtd made by vmbatch (dead, hung, or over [libvirt].max_rss_mib).",
)
REAPED = Metric(
    "vmbatch_orphans_reaped_total",
    "counter",
    "Leftovers the reaper removed (VMs, QEMU processes, appliances, job files, cache"
    " debris of jobs that no longer run).",
)
DRAINS = Metric(
    "vmbatch_node_drains_total",
    "counter",
    "Times vmbatch took this node out of service (Slurm drain, Torque offline).",
)
DRAINED = Metric(
    "vmbatch_node_drained",
    "gauge",
    "1 while a drain/offline that vmbatch set on this node stands, else 0.",
)
RUNNING = Metric(
    "vmbatch_job_vms_running",
    "gauge",
    "Batch jobs on this node whose VM is up (prologue done, epilogue not yet).",
)

#: Every metric, in the file's order.
METRICS = (
    STARTED,
    FINISHED,
    BOOT,
    DOWNLOAD,
    HITS,
    MISSES,
    CACHE_SIZE,
    CACHE_LIMIT,
    RESTARTS,
    REAPED,
    DRAINS,
    DRAINED,
    RUNNING,
)
_COUNTERS = {m.name: m for m in METRICS if m.kind == "counter"}


# -- what a finished job counts as ----------------------------------------------------


def outcome(line: Mapping[str, object]) -> tuple[str, str]:
    """(outcome, cause) of a finished job from its accounting record, read tolerantly:
    unknown keys are ignored and missing ones count as unknown.

    A vmbatch failure (``cause`` ``"SomeError: message"``) is ``failed`` with the error's
    class name (only the name: the message may name users and paths); otherwise the exit
    status decides: 0 ``succeeded``, a signal (a ``signal`` key, or a status above 128:
    128+N, shell style, from Slurm's ``exit:signal``; Torque's 256+N) ``signal``, other
    statuses ``exit_nonzero``, none ``unknown``.
    """
    cause = line.get("cause")
    if isinstance(cause, str) and cause.strip():
        head = cause.partition(":")[0].strip()
        if _CAUSE_CLASS.fullmatch(head):
            return "failed", head
        for prefix, label in _NOT_RUN:
            if cause.startswith(prefix):
                return "failed", label
        return "failed", "other"
    signal = line.get("exit_signal", line.get("signal"))
    status = line.get("exit_status")
    if isinstance(signal, int) and not isinstance(signal, bool) and signal > 0:
        return "failed", "signal"
    if not isinstance(status, int) or isinstance(status, bool):
        return "failed", "unknown"
    if status == 0:
        return "succeeded", "none"
    return "failed", "signal" if status > 128 else "exit_nonzero"


def boot_seconds(line: Mapping[str, object]) -> float | None:
    value = line.get("boot_seconds")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


# -- the public calls -------------------------------------------------------------------


def job_started(cfg: Config) -> None:
    """A prologue begins to prepare a job's VM."""
    update(cfg, counts={STARTED.name: 1})


def job_finished(cfg: Config, line: Mapping[str, object]) -> None:
    """An epilogue wrote the job's accounting record ``line``."""
    result, cause = outcome(line)
    job_id = line.get("job_id")
    update(
        cfg,
        counts={_key(FINISHED.name, {"outcome": result, "cause": cause}): 1},
        boot=boot_seconds(line),
        ending=job_id if isinstance(job_id, str) else None,
    )


def count(cfg: Config, metric: Metric, amount: float = 1) -> None:
    """Add ``amount`` to the unlabelled counter ``metric`` (and rewrite the file)."""
    if metric.name not in _COUNTERS or metric.labels:
        raise ValueError(f"{metric.name} is not an unlabelled counter")  # a bug here
    update(cfg, counts={metric.name: amount})


def refresh(cfg: Config) -> None:
    """Rewrite the file (the gauges) without counting anything."""
    update(cfg, counts={})


def update(
    cfg: Config,
    *,
    counts: Mapping[str, float],
    boot: float | None = None,
    ending: str | None = None,
) -> None:
    """Add ``counts`` (series key -> amount) and a boot observation to the node's state,
    then rewrite the text file, all under the state's lock. Never raises. ``ending``: a job
    whose epilogue is accounting it now (its record goes next): not counted as running."""
    if os.geteuid() != 0:
        return  # the counters are root's; a user's `vmbatch run` counts nowhere
    from vmbatch.hooks.policy import _locked  # imports hooks: not at import time

    try:
        # Root-only from creation: mkdir(parents=True) would make it with the umask's mode.
        cfg.batch.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(state_path(cfg)) as data:
            _add(data, counts, boot)
            write_textfile(cfg, data, ending=ending)
    except Exception as exc:  # noqa: BLE001 - metrics must never fail a hook or a command
        log.warning("metrics not updated: %s", exc)


def state_path(cfg: Config) -> Path:
    from vmbatch.hooks.policy import node_state_dir

    return node_state_dir(cfg) / "metrics.json"


# -- the state --------------------------------------------------------------------------


def _key(name: str, labels: Mapping[str, str]) -> str:
    """The series' key in the state, as the text format writes the series."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return float(value) if ok else 0.0  # type: ignore[arg-type]


def _add(data: dict[str, object], counts: Mapping[str, float], boot: float | None) -> None:
    raw = data.get("counters")
    counters: dict[str, object] = raw if isinstance(raw, dict) else {}
    for key, amount in counts.items():
        counters[key] = _number(counters.get(key)) + amount
    data["counters"] = counters
    if boot is not None:
        raw_h = data.get("boot")
        hist: dict[str, object] = raw_h if isinstance(raw_h, dict) else {}
        counted = _buckets(hist)
        for i, bound in enumerate(BOOT_BUCKETS):
            if boot <= bound:
                counted[i] += 1
        hist.update(
            buckets=counted,
            sum=_number(hist.get("sum")) + boot,
            count=_number(hist.get("count")) + 1,
        )
        data["boot"] = hist


# -- the text file ----------------------------------------------------------------------


def render(cfg: Config, data: Mapping[str, object], *, ending: str | None = None) -> str:
    """The exposition text of the state ``data`` plus the gauges measured now."""
    raw = data.get("counters")
    counters = raw if isinstance(raw, dict) else {}
    gauges = _gauges(cfg, ending)
    out: list[str] = []
    for m in METRICS:
        out += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}"]
        if m.kind == "counter":
            series = sorted(
                (k, _number(v))
                for k, v in counters.items()
                if k == m.name or k.startswith(m.name + "{")
            )
            if not series and not m.labels:
                series = [(m.name, 0.0)]
            out += [f"{k} {_fmt(v)}" for k, v in series]
        elif m.kind == "gauge":
            out.append(f"{m.name} {_fmt(gauges.get(m.name, 0.0))}")
        else:
            out += _histogram(m.name, data.get("boot"))
    return "\n".join(out) + "\n"


def _histogram(name: str, raw: object) -> list[str]:
    hist = raw if isinstance(raw, dict) else {}
    counted = _buckets(hist)
    total = _number(hist.get("count"))
    lines = [
        f'{name}_bucket{{le="{float(b)!r}"}} {_fmt(c)}'
        for b, c in zip(BOOT_BUCKETS, counted, strict=True)
    ]
    lines.append(f'{name}_bucket{{le="+Inf"}} {_fmt(total)}')
    lines += [f"{name}_sum {_fmt(_number(hist.get('sum')))}", f"{name}_count {_fmt(total)}"]
    return lines


def _buckets(hist: Mapping[str, object]) -> list[float]:
    """The cumulative bucket counts of ``hist`` (all 0 if missing or of other bounds)."""
    buckets = hist.get("buckets")
    if isinstance(buckets, list) and len(buckets) == len(BOOT_BUCKETS):
        return [_number(b) for b in buckets]
    return [0.0] * len(BOOT_BUCKETS)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _gauges(cfg: Config, ending: str | None = None) -> dict[str, float]:
    """Cache size and cap, job VMs up, the node's drain: each measured cheaply (directory
    listings, small JSON files); one that cannot be measured is left out (0)."""
    from vmbatch.hooks.jobstate import READY, StateStore
    from vmbatch.hooks.policy import read_mark
    from vmbatch.images.cache import ImageCache

    found: dict[str, float] = {CACHE_LIMIT.name: cfg.cache.max_size_gib * 2**30}
    measures: tuple[tuple[str, Callable[[], float]], ...] = (
        (CACHE_SIZE.name, lambda: sum(e.size for e in ImageCache(cfg).entries())),
        (
            RUNNING.name,
            lambda: sum(
                r.phase == READY and r.job_id != ending
                for r in StateStore(cfg.batch.state_dir).records()
            ),
        ),
        (DRAINED.name, lambda: int(read_mark(cfg) is not None)),
    )
    for name, measure in measures:
        try:
            found[name] = float(measure())
        except Exception as exc:  # noqa: BLE001 - one gauge must not cost the others
            log.warning("metrics: %s not measured: %s", name, exc)
    return found


def write_textfile(
    cfg: Config, data: Mapping[str, object], *, ending: str | None = None
) -> Path | None:
    """Replace ``[metrics].textfile`` atomically with :func:`render`'s text; None (nothing
    written) if there is no file configured or its directory does not exist (no
    node_exporter here: ``vmbatch doctor`` says so)."""
    if not cfg.metrics.textfile:
        return None
    path = Path(cfg.metrics.textfile)
    if not path.parent.is_dir():
        log.debug("metrics: %s does not exist; no metrics file written", path.parent)
        return None
    atomic_write(path, render(cfg, data, ending=ending).encode(), 0o644)
    return path
