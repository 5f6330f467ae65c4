"""Issue 17, items 7 and 8, against real VMs and a real libvirtd.

- The metrics file moves as real batch jobs run through the hooks (called as pbs_mom calls
  them, tests/system/test_torque.py's ``Mom``): a job that succeeds, one that exits
  non-zero and one whose prologue fails it (unknown image: no VM, no boot time). The file
  is parsed with prometheus_client's parser, as Prometheus would read it.
- ``vmbatch check`` returns 0 with a libvirtd that answers, 2 with one that is gone, and 0
  again once it is back; the libvirtd is a private one of this test
  (tests/system/libvirtd.py), stopped and started by its own PIDs: the shared one that
  other runs use is never touched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.system.conftest import BatchSite, Site, running_agent
from tests.system.libvirtd import PrivateLibvirtd
from tests.system.test_torque import Mom, _finish
from vmbatch import metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(path: Path) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _run(bs: BatchSite, script: str) -> tuple[Mom, int, str]:
    mom = Mom(bs, script)
    pro = mom.prologue()
    assert pro.returncode == 0, pro.stderr.decode()
    status, _, err = _finish(mom.starter())
    epi = mom.epilogue(status)
    assert epi.returncode == 0, epi.stderr.decode()
    return mom, status, err


def test_the_metrics_file_counts_real_jobs(batch_site: BatchSite) -> None:
    textdir = batch_site.site.root / "node-exporter"
    textdir.mkdir(mode=0o755)
    prom = textdir / "vmbatch.prom"
    batch_site.site.write(f'\n[metrics]\ntextfile = "{prom}"\n')

    _, ok_status, _ = _run(batch_site, "#!/bin/sh\necho fine\n")
    first = _samples(prom)
    assert ok_status == 0
    assert _get(first, "vmbatch_jobs_started_total") == 1
    assert _get(first, "vmbatch_jobs_finished_total", outcome="succeeded", cause="none") == 1
    assert _get(first, "vmbatch_boot_duration_seconds_count") == 1

    _, bad_status, _ = _run(batch_site, "#!/bin/sh\nexit 3\n")
    _, refused, err = _run(batch_site, "#!/bin/sh\n#VMBATCH image=no-such-image\ntrue\n")
    assert (bad_status, refused) == (3, 65), err

    records = batch_site.records()
    assert [r["exit_status"] for r in records] == [0, 3, 65]
    refused_cause = str(records[2]["cause"]).partition(":")[0]
    assert refused_cause.endswith("Error"), records[2]
    s = _samples(prom)
    fin = "vmbatch_jobs_finished_total"
    assert _get(s, "vmbatch_jobs_started_total") == 3
    assert _get(s, fin, outcome="succeeded", cause="none") == 1
    assert _get(s, fin, outcome="failed", cause="exit_nonzero") == 1
    assert _get(s, fin, outcome="failed", cause=refused_cause) == 1
    assert sum(v for (name, _), v in s.items() if name == fin) == 3

    boots = [float(r["boot_seconds"]) for r in records if r["boot_seconds"] is not None]
    assert len(boots) == 2, "the refused job never booted"
    hist = "vmbatch_boot_duration_seconds"
    assert _get(s, f"{hist}_count") == 2
    assert _get(s, f"{hist}_sum") == pytest.approx(sum(boots))
    assert _get(s, f"{hist}_bucket", le="+Inf") == 2
    for bound in metrics.BOOT_BUCKETS:
        expected = sum(b <= bound for b in boots)
        assert _get(s, f"{hist}_bucket", le=repr(bound)) == expected

    assert _get(s, "vmbatch_job_vms_running") == 0
    assert _get(s, "vmbatch_image_cache_limit_bytes") == 50 * 2**30
    assert prom.stat().st_mode & 0o777 == 0o644
    assert list(textdir.iterdir()) == [prom], "no temporary file is left"
    text = prom.read_text()
    assert batch_site.user.name not in text and "no-such-image" not in text
    state = batch_site.state_dir / "node" / "metrics.json"
    assert state.stat().st_mode & 0o777 == 0o600


def _check(site: Site) -> tuple[int, str]:
    res = site.vmbatch("check")
    lines = res.stdout.decode().splitlines()
    assert len(lines) == 1, res.stdout.decode() + res.stderr.decode()
    return res.returncode, lines[0]


def test_check_is_critical_while_libvirtd_is_gone_and_ok_once_it_is_back(site: Site) -> None:
    private = PrivateLibvirtd(site.root / "libvirtd")
    site.write(
        f"""
[libvirt]
uri = "{private.uri}"
pid_file = "{private.pidfile}"
restart_command = []
[batch]
default_image = "demo"
state_dir = "{site.root}/state"
user_dir = "{site.root}/run"
accounting_log = "{site.root}/accounting.jsonl"
[metrics]
textfile = ""
[health]
libvirt_timeout = 5
"""
    )
    with private, running_agent(site):  # a node runs its agent (else: a warning)
        status, line = _check(site)
        assert status == 0, line
        assert line.startswith("VMBATCH OK - ") and " checks passed | checks=" in line, line
        assert "orphans=0;0;;0" in line

        assert private.pid() is not None
        private.stop()
        assert private.pid() is None
        status, line = _check(site)
        assert status == 2, line
        assert line.startswith("VMBATCH CRITICAL - ")
        text = line.split(" | ")[0]
        assert "libvirtd: " in text and str(private.socket) in text, line
        assert line.count(" | ") == 1

        private.start()
        status, line = _check(site)
        assert status == 0, line
        assert line.startswith("VMBATCH OK - ")
