"""The one table from error dispositions to exit codes.

``vmbatch`` commands (``run``, ``doctor``, ...) exit with sysexits(3)-style codes so scripts
can tell the cases apart; ``vmbatch run`` otherwise passes the guest command's own status
through, and 128+N after a signal N, like a shell. The hook columns follow the schedulers'
documented contracts (see docs/platform.md and docs/admin-guide.md) and are used by the
batch-system hooks:

Which of these a hook uses is decided by the error's fault (:mod:`vmbatch.hooks.policy`):
job, transient and image faults always end the prologue with 0 and reach the job through
the starter (its message and exit status: fail, requeue or hold); only node faults use the
non-zero columns below.

- Torque prologue: 0 runs the job, 1 aborts it, any other non-zero requeues it. An aborted
  job's .o/.e files are not delivered, so the user would never learn why. Node faults
  return 2 (requeue) and take the node offline (``pbsnodes -o`` with vmbatch's note):
  pbs_mom redispatches a requeued job at once, to the same node.
- Slurm Prolog: any non-zero drains the node and requeues+holds the job, so only node
  faults return non-zero (the node is drained with vmbatch's reason).
- Slurm Epilog: non-zero drains the node; only when the VM may still be running.
"""

from __future__ import annotations

from vmbatch.errors import Disposition

#: Exit status of ``vmbatch`` commands per disposition (sysexits.h names in comments).
CLI = {
    Disposition.ABORT_JOB: 65,  # EX_DATAERR: the request itself is wrong
    Disposition.REQUEUE: 75,  # EX_TEMPFAIL: try again later
    Disposition.OFFLINE_NODE: 69,  # EX_UNAVAILABLE: this node needs an admin
}
#: An exception vmbatch did not expect: never success.
CLI_INTERNAL_ERROR = 70  # EX_SOFTWARE

TORQUE_PROLOGUE = {
    Disposition.ABORT_JOB: 0,  # the job starter reports the error in the job's .e file
    Disposition.REQUEUE: 2,
    Disposition.OFFLINE_NODE: 2,  # plus `pbsnodes -o`, or the job loops on this node
}
#: Torque prologue: abort the job (no .o/.e delivered): only when even the message for the
#: job's starter could not be left, and `pbsnodes -o` failed, so a requeue would loop.
TORQUE_PROLOGUE_ABORT = 1

SLURM_PROLOG = {
    Disposition.ABORT_JOB: 0,  # the job starter reports the error in the job's output
    Disposition.REQUEUE: 1,
    Disposition.OFFLINE_NODE: 1,
}

#: Slurm Epilog when the job's VM could not be made sure gone (drains the node).
SLURM_EPILOG_FAILED = 1
