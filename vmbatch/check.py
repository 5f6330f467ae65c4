"""``vmbatch check``: the node's health as one Nagios-style status line and exit status.

Outside contracts:

- Nagios plugin output (Nagios Plugin API; the Monitoring Plugins Development
  Guidelines, https://www.monitoring-plugins.org/doc/guidelines.html): exit status 0 OK,
  1 WARNING, 2 CRITICAL, 3 UNKNOWN, and one line ``SERVICE STATE - text | perfdata``,
  performance data as space-separated ``'label'=value[UOM];[warn];[crit];[min];[max]``.
  "|" separates the text from the data, so the text never contains one. UNKNOWN is for
  the plugin's own trouble (run as the wrong user, bad options); a check that times out
  is CRITICAL, as the guidelines ask of timeouts.
- Slurm's ``HealthCheckProgram`` (slurm.conf(5)): run as root with no arguments every
  ``HealthCheckInterval`` seconds, killed after 60 s; Slurm ignores its exit status ("Any
  action to be taken must be explicitly performed by the program"), so ``--take-out``
  drains the node itself. NHC's ``check_cmd_status`` (LBNL NHC ``scripts/lbnl_cmd.nhc``)
  runs a command with a timeout (``-t``, 5 s by default) and fails the node on a
  non-zero exit status; NHC then drains it.

Bounded time: the checks run in order in a daemon thread; whatever has not finished
after ``[health].timeout`` seconds is reported CRITICAL ("did not finish") and the
command returns at once (the thread dies with the process).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from vmbatch.config import Config
from vmbatch.doctor import Check, Severity, Step, node_checks

SERVICE = "VMBATCH"
#: At most this many characters of problem text in the status line.
MAX_TEXT = 900


@dataclass(frozen=True, slots=True)
class Result:
    """What ``vmbatch check`` found: every check (finished or not) and the time taken."""

    checks: tuple[Check, ...]
    seconds: float

    @property
    def status(self) -> Severity:
        return max((c.status for c in self.checks), default=Severity.OK)


def run(cfg: Config, steps: list[Step], timeout: float | None = None) -> Result:
    """Run ``steps`` in order, for at most ``timeout`` seconds (``[health].timeout``)."""
    limit = cfg.health.timeout if timeout is None else timeout
    done: list[list[Check]] = []
    started = time.monotonic()

    def work() -> None:
        for name, step in steps:
            try:
                done.append(step())
            except Exception as exc:  # noqa: BLE001 - one broken check must not hide the rest
                done.append([Check(False, name, f"the check itself failed: {exc!r}")])

    worker = threading.Thread(target=work, name="vmbatch-check", daemon=True)
    worker.start()
    worker.join(limit)
    finished = list(done)  # a snapshot: the worker may still append
    checks = [c for group in finished for c in group]
    for i, (name, _) in enumerate(steps[len(finished) :]):
        detail = (
            f"did not finish within [health].timeout ({limit:g} s)"
            if i == 0
            else "not run: an earlier check did not finish"
        )
        checks.append(Check(False, name, detail, "see `vmbatch doctor` for what hangs"))
    return Result(tuple(checks), time.monotonic() - started)


def one_line(text: str) -> str:
    """One line, no "|" (it starts the performance data)."""
    return " ".join(text.replace("|", "/").split())


def status_line(result: Result, timeout: float) -> str:
    """``VMBATCH STATE - text | perfdata``."""
    state = result.status
    bad = sorted((c for c in result.checks if not c.ok), key=lambda c: -c.status)
    if bad:
        text = "; ".join(f"{c.what}: {c.detail}" for c in bad)
        text = one_line(text)
        if len(text) > MAX_TEXT:
            text = text[: MAX_TEXT - 3] + "..."
        counts = ", ".join(
            f"{n} {s.name.lower()}"
            for s in (Severity.CRITICAL, Severity.WARNING)
            if (n := sum(c.status is s for c in result.checks))
        )
        text = f"{counts}: {text}"
    else:
        text = f"{len(result.checks)} checks passed"
    perf = [f"checks={len(result.checks)};;;0", f"time={result.seconds:.2f}s;;{timeout:g};0"]
    perf += [p for c in result.checks for p in c.perf]
    return f"{SERVICE} {state.name} - {text} | {' '.join(perf)}"


def act(cfg: Config, result: Result, env: Mapping[str, str]) -> str | None:
    """``--take-out``: on CRITICAL take the node out of service (Slurm drain, Torque
    offline) with the first critical problem as the reason, recorded as vmbatch's own
    (:func:`vmbatch.hooks.policy.take_out`); on OK or WARNING return a node vmbatch took out
    to service if the scheduler still shows vmbatch's reason and doctor's node checks pass
    (:func:`vmbatch.hooks.policy.resume_node`, as ``vmbatch cleanup --stale`` does). Returns
    what happened, or None if nothing did."""
    from vmbatch.hooks import policy, slurm, torque

    if result.status < Severity.CRITICAL:
        # The same test as the reaper's resume (`vmbatch cleanup --stale`): doctor's node
        # checks, which also cover what a drain by a failed prologue may have been for.
        return policy.resume_node(
            cfg,
            failing=lambda: [f"{c.what}: {c.detail}" for c in node_checks(cfg) if not c.ok],
        )
    worst = next(c for c in result.checks if c.status >= Severity.CRITICAL)
    reason = one_line(f"vmbatch check: {worst.what}: {worst.detail}")
    if cfg.tools.scontrol.exists() and slurm.config_present(env):
        node = env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
        said = policy.take_out(
            cfg,
            lambda: slurm.drain(cfg, node, reason, env),
            lambda clean: policy.NodeMark(
                "slurm", node, clean, time.time(), env.get("SLURM_CONF", "")
            ),
        )
        return f"node {node}: " + (f"drained ({said})" if said else "could not be drained")
    if cfg.tools.pbsnodes.exists():
        node = socket.gethostname()
        said = policy.take_out(
            cfg,
            lambda: torque.offline_note(reason) if torque.offline(cfg, reason) else None,
            lambda note: policy.NodeMark("torque", node, note, time.time()),
        )
        return f"node {node}: " + (f"offline ({said})" if said else "could not be set offline")
    return "no scheduler client here to take the node out with ([tools])"
