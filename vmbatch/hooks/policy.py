"""The batch hooks' failure policy: whose fault a failure is decides what happens to the job
and to the node (docs/admin-guide.md, "Failure policy").

Every :class:`~vmbatch.errors.VmBatchError` names its :class:`~vmbatch.errors.Fault`:

========== ================================================== ========================
fault      the job                                            the node
========== ================================================== ========================
job        fails; the message is in its output                stays in service
transient  requeued (Slurm), at most ``max_requeues`` times,  stays in service
           then held; Torque: fails with the message
image      fails, or is requeued like a transient failure     stays in service; after
           (``[batch].image_failure``)                        ``image_failures`` in the
                                                              window the image is
                                                              refused here for a while
node       requeued by the scheduler                          drained / offline, the
                                                              cause as the reason;
                                                              vmbatch resumes it once
                                                              the cause has cleared
========== ================================================== ========================

How each scheduler is told, without draining a node for a job's or an image's fault:

- Slurm: any non-zero Prolog drains the node (slurm.conf(5), "Prolog"), so the Prolog exits
  0 and leaves the message and the job starter's exit status in the job's user directory.
  The starter prints the message into the job's output and exits with that status:
  ``[batch].requeue_exit`` requeues the job (slurm.conf ``RequeueExit``: "Jobs will be put
  back in to pending state and later scheduled again"), ``hold_exit`` requeues it held
  (``RequeueExitHold``, state ``JOB_SPECIAL_EXIT``). The Prolog's
  ``SLURM_JOB_RESTART_COUNT`` counts earlier runs, so a job is requeued at most
  ``max_requeues`` times: never a loop.
- Torque: a non-zero prologue other than 1 makes pbs_mom redispatch the job at once, to the
  same node (docs/platform.md measured ~95 times in 30 s), and exit 1 loses the job's
  .o/.e files. Torque has no requeue-by-exit-status, so a transient or image failure fails
  the job once with the message in its .e file; only node faults take the node offline.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from vmbatch import metrics, state
from vmbatch.config import Config
from vmbatch.errors import Disposition, Fault, ImageCoolOffError, VmBatchError
from vmbatch.hooks import slurm, torque
from vmbatch.hooks.exitcodes import CLI
from vmbatch.state import atomic_write

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """What the prologue's failure means for the job."""

    FAIL = "fail"  # the starter prints the message and exits non-zero
    REQUEUE = "requeue"  # Slurm: the starter exits [batch].requeue_exit
    HOLD = "hold"  # Slurm: the starter exits [batch].hold_exit
    NODE = "node"  # the node goes out of service; the scheduler requeues the job


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome, the message for the job's output and the starter's exit status."""

    outcome: Outcome
    message: str
    status: int


def decide(
    cfg: Config, error: VmBatchError, *, scheduler: str, restarts: int, node: str
) -> Decision:
    """What happens to a job whose prologue failed with ``error``."""
    fault = error.fault
    text = str(error)
    if fault is Fault.NODE:
        return Decision(Outcome.NODE, text, CLI[Disposition.OFFLINE_NODE])
    fail_status = CLI[error.disposition]
    requeue = fault is Fault.TRANSIENT or (
        fault is Fault.IMAGE and cfg.batch.image_failure == "requeue"
    )
    if not requeue:
        return Decision(Outcome.FAIL, text, fail_status)
    if scheduler != "slurm":
        return Decision(
            Outcome.FAIL,
            f"{text}; the job failed (Torque cannot requeue it without sending it straight"
            f" back to this node); node {node} stays in service: submit the job again",
            fail_status,
        )
    limit = cfg.batch.max_requeues
    if restarts < limit:
        return Decision(
            Outcome.REQUEUE,
            f"{text}; vmbatch requeued the job (run {restarts + 1} of at most {limit + 1});"
            f" node {node} stays in service",
            cfg.batch.requeue_exit,
        )
    why = f"{text}; the job already ran {restarts + 1} times ([batch].max_requeues = {limit})"
    if cfg.batch.hold_exit:
        return Decision(
            Outcome.HOLD,
            f"{why} and is held: once the cause is fixed, release it with `scontrol release JOBID`",
            cfg.batch.hold_exit,
        )
    return Decision(Outcome.FAIL, f"{why} and was failed", fail_status)


def restart_count(env: Mapping[str, str]) -> int:
    """Earlier runs of the job (Slurm Prolog's ``SLURM_JOB_RESTART_COUNT``; absent: 0)."""
    text = env.get("SLURM_JOB_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or "0"
    return int(text) if text.isdigit() else 0


# -- image cool-off -------------------------------------------------------------------------


def node_state_dir(cfg: Config) -> Path:
    """Root-only directory of node-wide (not per-job) state, inside ``[batch].state_dir``;
    a subdirectory, so no job id can name its files."""
    return cfg.batch.state_dir / "node"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, object]]:
    """Read-modify-write ``path`` (JSON object) under an exclusive flock of ``path.lock``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(
        path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = _read(path)
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            atomic_write(path, (json.dumps(data, sort_keys=True, indent=1) + "\n").encode())
    finally:
        os.close(fd)


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): starting afresh", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True, slots=True)
class ImageStatus:
    """One image's recent failures on this node."""

    name: str
    failures: tuple[float, ...] = ()
    last_error: str = ""
    refused_until: float = 0.0


class ImageHealth:
    """Failures of each image on this node, and the cool-off that follows too many.

    ``state_dir/node/images.json`` (root-only, replaced atomically, one flock around each
    update so concurrent prologues count every failure).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.path = node_state_dir(cfg) / "images.json"

    def _status(self, data: Mapping[str, object], name: str) -> ImageStatus:
        raw = data.get(name)
        if not isinstance(raw, dict):
            return ImageStatus(name)
        failures = tuple(float(t) for t in raw.get("failures", []) if isinstance(t, int | float))
        return ImageStatus(
            name,
            failures,
            str(raw.get("last_error", "")),
            float(raw.get("refused_until", 0.0) or 0.0),
        )

    def statuses(self) -> list[ImageStatus]:
        data = _read(self.path)
        return [self._status(data, name) for name in sorted(data)]

    def check(self, name: str, now: float | None = None) -> None:
        """Raise :class:`ImageCoolOffError` while ``name`` is refused on this node."""
        now = time.time() if now is None else now
        status = self._status(_read(self.path), name)
        if status.refused_until > now:
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.refused_until))
            raise ImageCoolOffError(
                f"image {name!r} failed on this node {len(status.failures)} times within"
                f" {self.cfg.batch.image_failure_window:.0f} s (last: {status.last_error[:200]});"
                f" it is refused here until {until}",
                hint=f"an admin who fixed the image can lift this: `vmbatch image cooloff"
                f" --clear {name}`",
            )

    def failed(self, name: str, error: VmBatchError, now: float | None = None) -> bool:
        """Count one failure of ``name``; True if that starts its cool-off."""
        now = time.time() if now is None else now
        batch = self.cfg.batch
        with _locked(self.path) as data:
            status = self._status(data, name)
            recent = [t for t in status.failures if now - t < batch.image_failure_window]
            recent.append(now)
            start = bool(batch.image_failures) and len(recent) >= batch.image_failures
            until = now + batch.image_cooloff if start else status.refused_until
            data[name] = {
                "failures": recent,
                "last_error": str(error)[:500],
                "refused_until": until,
            }
        if start:
            log.error(
                "image %s failed %d times on this node within %.0f s: refused here for %.0f s",
                name,
                len(recent),
                batch.image_failure_window,
                batch.image_cooloff,
            )
        return start

    def succeeded(self, name: str) -> None:
        """A job booted ``name``: its failure count starts again."""
        if name not in _read(self.path):
            return  # the common case: no lock, no write
        with _locked(self.path) as data:
            data.pop(name, None)

    def clear(self, name: str | None = None) -> list[str]:
        """Lift the cool-off (and forget the failures) of ``name``, or of every image."""
        with _locked(self.path) as data:
            names = [name] if name is not None else list(data)
            cleared = [n for n in names if data.pop(n, None) is not None]
        return cleared


def counts_against_image(error: VmBatchError) -> bool:
    """An image failure that counts towards its cool-off (not the refusal itself)."""
    return error.fault is Fault.IMAGE and not isinstance(error, ImageCoolOffError)


# -- the node's own drain, and its end ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeMark:
    """vmbatch took this node out of service (Slurm drain, Torque offline) with ``reason``."""

    scheduler: str
    node: str
    reason: str
    time: float
    #: Slurm: the ``SLURM_CONF`` slurmd gave the Prolog (scontrol needs it to find the cluster).
    slurm_conf: str = ""
    #: The hook that took the node out (:func:`vmbatch.state.process_identity`): the node
    #: stays out while it runs (see :func:`resume_node`).
    hook: str = ""


def _mark_path(cfg: Config) -> Path:
    return node_state_dir(cfg) / "out-of-service.json"


def _store(data: dict[str, object], mark: NodeMark) -> None:
    data.clear()
    data.update(
        scheduler=mark.scheduler,
        node=mark.node,
        reason=mark.reason,
        time=mark.time,
        slurm_conf=mark.slurm_conf,
        hook=mark.hook,
    )


def _load(data: Mapping[str, object]) -> NodeMark | None:
    try:
        return NodeMark(
            scheduler=str(data["scheduler"]),
            node=str(data["node"]),
            reason=str(data["reason"]),
            time=float(data["time"]),  # type: ignore[arg-type]
            slurm_conf=str(data.get("slurm_conf", "")),
            hook=str(data.get("hook", "")),
        )
    except (KeyError, TypeError, ValueError):
        return None


def mark_out(cfg: Config, mark: NodeMark) -> None:
    """Remember that vmbatch took the node out, so that it may bring it back itself."""
    try:
        with _locked(_mark_path(cfg)) as data:
            _store(data, mark)
    except OSError as exc:
        log.error("could not record that vmbatch took node %s out: %s", mark.node, exc)


def take_out(
    cfg: Config, out: Callable[[], str | None], mark: Callable[[str], NodeMark]
) -> str | None:
    """Take the node out with ``out()`` (which returns the reason as the scheduler got it,
    or None if that failed) and record ``mark(reason)``, both under the record's lock.

    Found by bench/soak.py: two Prologs failing at once drained the node in one order and
    recorded their reasons in the other; the reaper then saw a reason other than the
    recorded one, took the drain for an admin's and left the node out for good. Under the
    lock the last reason set is the one recorded, and :func:`resume_node` (same lock) cannot
    resume the node between a drain and its record.
    """
    try:
        with _locked(_mark_path(cfg)) as data:
            reason = out()
            if reason is not None:
                _store(data, mark(reason))
    except OSError as exc:  # the record's directory is unusable: still take the node out
        log.error("could not record that vmbatch took the node out: %s", exc)
        reason = out()
    if reason is not None:
        metrics.count(cfg, metrics.DRAINS)
    return reason


def read_mark(cfg: Config) -> NodeMark | None:
    return _load(_read(_mark_path(cfg)))


def clear_mark(cfg: Config) -> None:
    with _locked(_mark_path(cfg)) as data:
        data.clear()


def _hook_running(mark: NodeMark) -> str | None:
    """Found by bench/soak.py: the reaper resumed the node between a failing Prolog's drain
    and its exit; slurmctld then drained the node again for the failed Prolog, with its own
    reason "Prolog error", which is not vmbatch's to undo: out until an admin came. So the
    node stays out while the hook that took it out runs."""
    if mark.hook and state.is_alive(mark.hook):
        return (
            f"node {mark.node}: stays out of service ({mark.reason}): the hook that took it"
            f" out (pid {mark.hook.split(':')[0]}) is still running"
        )
    return None


def resume_node(cfg: Config, *, failing: Callable[[], list[str]]) -> str | None:
    """Bring the node back if vmbatch took it out and the cause has cleared.

    ``failing()`` lists what is still wrong (the node checks of ``vmbatch doctor``). Only a
    drain/offline that is still vmbatch's own (same reason, as recorded when it was set) is
    ended; one an admin set or changed meanwhile is left alone, and so is the record of a
    node that is back already. The decision and the resume happen under the record's lock
    (:func:`take_out`), the checks before it. Returns what happened, for the caller's report.
    """
    first = read_mark(cfg)
    if first is None:
        return None
    if busy := _hook_running(first):
        return busy
    still = failing()
    with _locked(_mark_path(cfg)) as data:
        mark = _load(data)
        if mark is None:
            return None
        if busy := _hook_running(mark):
            return busy
        env = {"SLURM_CONF": mark.slurm_conf} if mark.slurm_conf else {}
        try:
            if mark.scheduler == "slurm":
                ours = slurm.drained_by(cfg, mark.node, mark.reason, env)
            else:
                ours = torque.offline_by(cfg, mark.node, mark.reason)
        except VmBatchError as exc:
            return f"node {mark.node}: cannot ask the scheduler whether it is still out ({exc})"
        if not ours:
            data.clear()
            return (
                f"node {mark.node}: back in service already"
                if ours is None
                else f"node {mark.node}: taken out for another reason meanwhile; left to the admin"
            )
        if still:
            return f"node {mark.node}: stays out of service ({mark.reason}): {still[0]}"
        try:
            if mark.scheduler == "slurm":
                slurm.resume(cfg, mark.node, env)
            else:
                torque.online(cfg, mark.node)
        except VmBatchError as exc:
            return f"node {mark.node}: could not return it to service ({exc})"
        data.clear()
    log.warning("node %s returned to service: %r has cleared", mark.node, mark.reason)
    return f"node {mark.node}: returned to service (the cause {mark.reason!r} has cleared)"
