"""A short soak in CI: bench/soak.py's run with 12 jobs and three fault kinds.

The harness starts its own Slurm, libvirtd and image server and stops them whatever happens
(see bench/soak.py); the schedule is fixed by the seed: job 1 downloads an image from a
server that stalls mid-download, job 4 meets a guest that refuses SSH logins for its first
seconds, job 5's prologue loses libvirtd (SIGKILLed while it boots, restarted 2 s later:
vmbatch drains the node, the reaper returns it, Slurm holds the job, the harness releases
it, it runs again). Every job must end right or explained, nothing may be left.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tests.system.conftest import ROOT

SEED = 12  # schedule: image-stall on job 1, ssh-refused on job 4, libvirtd-kill on job 5
KINDS = ("libvirtd-kill", "image-stall", "ssh-refused")


def _soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_with_faults_loses_nothing_leaks_nothing_drains_nothing(
    guest_dir: Path,
) -> None:
    soak = _soak()
    opts = soak.Options(
        jobs=12, fault_rate=0.3, faults=KINDS, seed=SEED, guest=guest_dir, max_minutes=10
    )
    report = soak.run(opts)
    print(report.render())
    assert report.submitted == 12
    assert not report.harness_errors, report.harness_errors
    # Each fault kind struck at least once (the seed's schedule has one of each).
    assert {k: c["injected"] for k, c in report.faults.items()} == dict.fromkeys(KINDS, 1)
    assert report.lost == []
    assert {k: v for k, v in report.leaks.items() if v} == {}
    assert report.leaks["domains"] == [] and report.leaks["disk files"] == []
    assert report.left_drained == "" and report.drains_unexplained == report.drains_stuck == []
    assert report.outcomes["ok"] == 12, report.render()
    assert report.image_server["stalls"] == 1 and report.image_server["ranged"] >= 1
    assert report.exit_status() == 0
