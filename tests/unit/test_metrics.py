"""The metrics file: what each event counts, the text node_exporter reads (checked with
prometheus_client's own parser), the root-only state under its lock, and that a metrics
failure never fails its caller."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmbatch import config, metrics
from vmbatch.errors import ConfigError
from vmbatch.hooks import accounting, batch, policy
from vmbatch.hooks.jobstate import READY, Record, StateStore
from vmbatch.images.cache import ImageCache
from vmbatch.libvirt import health


def _cfg(tmp_path: Path, **sections: Any) -> config.Config:
    (tmp_path / "textfiles").mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "paths": {"job_dir": str(tmp_path / "jobs"), "cache_dir": str(tmp_path / "cache")},
        "batch": {
            "state_dir": str(tmp_path / "state"),
            "user_dir": str(tmp_path / "users"),
            "accounting_log": str(tmp_path / "log" / "accounting.jsonl"),
        },
        "metrics": {"textfile": str(tmp_path / "textfiles" / "vmbatch.prom")},
        "cache": {"max_size_gib": 2},
        "checkpoint": {"dir": str(tmp_path / "checkpoints")},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config.parse(data)


def _samples(cfg: config.Config) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the metrics file, parsed as Prometheus parses it."""
    text = Path(cfg.metrics.textfile).read_text()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def _value(cfg: config.Config, name: str, **labels: str) -> float:
    return _samples(cfg)[(name, tuple(sorted(labels.items())))]


# -- what a finished job counts as ------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({"exit_status": 0, "cause": None}, ("succeeded", "none")),
        ({"exit_status": 3, "cause": None}, ("failed", "exit_nonzero")),
        ({"exit_status": 143, "cause": None}, ("failed", "signal")),  # 128+SIGTERM
        ({"exit_status": 271}, ("failed", "signal")),  # Torque's 256+SIGTERM
        ({"exit_status": 0, "signal": 9}, ("failed", "signal")),  # an older key
        ({"exit_status": 0, "exit_signal": 9}, ("failed", "signal")),  # Slurm's exit:signal
        ({"exit_status": None, "cause": None}, ("failed", "unknown")),
        ({}, ("failed", "unknown")),
        ({"exit_status": True}, ("failed", "unknown")),
        (
            {"exit_status": 0, "cause": "GuestBootTimeoutError: vm alice-7 did not boot"},
            ("failed", "GuestBootTimeoutError"),
        ),
        ({"cause": "no prologue state (prologue did not run)"}, ("failed", "no_prologue")),
        ({"cause": "something new"}, ("failed", "other")),
        ({"cause": "evil\nError: x", "exit_status": 0}, ("failed", "other")),
        ({"cause": "", "exit_status": 0, "new_key": [1, 2]}, ("succeeded", "none")),
    ],
)
def test_outcome_and_cause_class_come_from_the_record_read_tolerantly(
    line: dict[str, object], expected: tuple[str, str]
) -> None:
    assert metrics.outcome(line) == expected


def test_every_cause_of_a_job_that_never_ran_has_its_own_label() -> None:
    """The accounting causes that are not error classes (accounting.why_not_run) map to
    fixed labels, never "other", so a dashboard can tell them apart."""
    from vmbatch.hooks.jobstate import FAILED, PREPARING

    rec = Record(
        job_id="1", scheduler="slurm", user="u", phase=READY, started=100.0, boot_seconds=5.0
    )
    causes = [
        accounting.why_not_run(None, None, accounting.JobEnd()),
        accounting.why_not_run(None, None, accounting.JobEnd(job_started=False)),
        accounting.why_not_run(
            dataclasses.replace(rec, phase=PREPARING), None, accounting.JobEnd()
        ),
        accounting.why_not_run(rec, accounting.Marker(not_started="x"), accounting.JobEnd()),
        accounting.why_not_run(rec, None, accounting.JobEnd(end_time=101.0)),
        accounting.why_not_run(rec, None, accounting.JobEnd(end_time=101.0, reason="TimeLimit")),
        accounting.why_not_run(rec, None, accounting.JobEnd(job_started=False, exit_status=1)),
        accounting.why_not_run(rec, None, accounting.JobEnd()),
    ]
    labels = [metrics.outcome({"cause": c, "exit_status": 0})[1] for c in causes]
    assert "other" not in labels, dict(zip(causes, labels, strict=True))
    assert len(set(labels)) == 7  # the two "no prologue state" causes share one
    failed = dataclasses.replace(rec, phase=FAILED, cause="GuestBootTimeoutError: slow")
    cause = accounting.why_not_run(failed, None, accounting.JobEnd())
    assert metrics.outcome({"cause": cause}) == ("failed", "GuestBootTimeoutError")


# -- the file ---------------------------------------------------------------------------


def test_the_file_parses_and_every_metric_has_help_and_type(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    metrics.refresh(cfg)
    path = Path(cfg.metrics.textfile)
    assert path.stat().st_mode & 0o777 == 0o644, "node_exporter runs as its own user"
    text = path.read_text()
    declared = {f.name: f.type for f in text_string_to_metric_families(text)}
    for m in metrics.METRICS:
        # the parser names counter families without their _total suffix
        assert declared[m.name.removesuffix("_total")] == m.kind
        assert f"# HELP {m.name} " in text
    assert _value(cfg, "vmbatch_jobs_started_total") == 0
    assert _value(cfg, "vmbatch_boot_duration_seconds_count") == 0
    assert _value(cfg, "vmbatch_image_cache_limit_bytes") == 2 * 2**30
    assert not [p for p in path.parent.iterdir() if p != path], "no temporary file is left"


def test_jobs_move_the_counters_and_the_boot_histogram(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    metrics.job_started(cfg)
    metrics.job_started(cfg)
    metrics.job_started(cfg)
    metrics.job_finished(cfg, {"exit_status": 0, "cause": None, "boot_seconds": 3.2})
    metrics.job_finished(cfg, {"exit_status": 1, "cause": None, "boot_seconds": 47.0})
    metrics.job_finished(cfg, {"exit_status": None, "cause": "ImageError: x", "boot_seconds": None})
    assert _value(cfg, "vmbatch_jobs_started_total") == 3
    fin = "vmbatch_jobs_finished_total"
    assert _value(cfg, fin, outcome="succeeded", cause="none") == 1
    assert _value(cfg, fin, outcome="failed", cause="exit_nonzero") == 1
    assert _value(cfg, fin, outcome="failed", cause="ImageError") == 1
    boot = "vmbatch_boot_duration_seconds"
    assert _value(cfg, f"{boot}_count") == 2, "a job that never booted has no boot time"
    assert _value(cfg, f"{boot}_sum") == pytest.approx(50.2)
    assert _value(cfg, f"{boot}_bucket", le="2.0") == 0
    assert _value(cfg, f"{boot}_bucket", le="5.0") == 1
    assert _value(cfg, f"{boot}_bucket", le="45.0") == 1
    assert _value(cfg, f"{boot}_bucket", le="60.0") == 2
    assert _value(cfg, f"{boot}_bucket", le="+Inf") == 2


def test_the_state_is_root_only_and_survives_the_process(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    metrics.count(cfg, metrics.REAPED, 4)
    state = metrics.state_path(cfg)
    assert state.stat().st_mode & 0o777 == 0o600
    assert state.parent.stat().st_mode & 0o777 == 0o700
    assert cfg.batch.state_dir.stat().st_mode & 0o777 == 0o700, "metrics may come first"
    Path(cfg.metrics.textfile).unlink()  # a new process starts from the state alone
    metrics.count(cfg, metrics.REAPED, 1)
    assert _value(cfg, "vmbatch_orphans_reaped_total") == 5


def test_concurrent_updates_lose_no_increment(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)

    def worker() -> None:
        for _ in range(20):
            metrics.job_started(cfg)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _value(cfg, "vmbatch_jobs_started_total") == 120


def test_no_textfile_or_no_node_exporter_directory_writes_nothing_but_counts(
    tmp_path: Path,
) -> None:
    off = _cfg(tmp_path, metrics={"textfile": ""})
    metrics.job_started(off)
    assert not (tmp_path / "textfiles" / "vmbatch.prom").exists()
    absent = _cfg(tmp_path, metrics={"textfile": str(tmp_path / "nope" / "vmbatch.prom")})
    metrics.job_started(absent)
    assert not (tmp_path / "nope").exists(), "vmbatch does not create node_exporter's directory"
    on = _cfg(tmp_path)
    metrics.refresh(on)
    assert _value(on, "vmbatch_jobs_started_total") == 2


def test_a_user_process_counts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    metrics.job_started(cfg)
    assert not metrics.state_path(cfg).exists()
    assert not Path(cfg.metrics.textfile).exists()


def test_a_metrics_failure_is_a_warning_never_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path)
    (tmp_path / "state").write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        metrics.job_finished(cfg, {"exit_status": 0})
    assert "metrics not updated" in caplog.text


def test_an_unreadable_state_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path)
    metrics.job_started(cfg)
    metrics.state_path(cfg).write_text("{broken")
    with caplog.at_level(logging.WARNING):
        metrics.job_started(cfg)
    assert "unreadable" in caplog.text
    assert _value(cfg, "vmbatch_jobs_started_total") == 1
    metrics.state_path(cfg).write_text(json.dumps({"counters": {"x": "y"}, "boot": [1]}))
    metrics.job_finished(cfg, {"exit_status": 0, "boot_seconds": 1})
    assert _value(cfg, "vmbatch_boot_duration_seconds_count") == 1


def test_only_unlabelled_counters_can_be_counted_directly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an unlabelled counter"):
        metrics.count(_cfg(tmp_path), metrics.FINISHED)
    with pytest.raises(ValueError, match="not an unlabelled counter"):
        metrics.count(_cfg(tmp_path), metrics.CACHE_SIZE)


def test_gauges_measure_the_cache_the_running_vms_and_the_drain(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    images = tmp_path / "cache" / "images"
    images.mkdir(parents=True)
    (images / "a-0123456789abcdef.img").write_bytes(b"x" * 1000)
    (images / "b-0123456789abcdef.img").write_bytes(b"y" * 24)
    store = StateStore(cfg.batch.state_dir)
    store.write(Record("1", "slurm", "alice", phase=READY))
    store.write(Record("2", "slurm", "bob"))  # still preparing
    policy.take_out(
        cfg, lambda: "vmbatch: disk full", lambda r: policy.NodeMark("slurm", "n1", r, 1.0)
    )
    assert _value(cfg, "vmbatch_image_cache_size_bytes") == 1024
    assert _value(cfg, "vmbatch_job_vms_running") == 1
    assert _value(cfg, "vmbatch_node_drained") == 1
    assert _value(cfg, "vmbatch_node_drains_total") == 1
    # The job an epilogue accounts now is no longer running (its record goes next).
    metrics.job_finished(cfg, {"job_id": "1", "exit_status": 0})
    assert _value(cfg, "vmbatch_job_vms_running") == 0
    policy.clear_mark(cfg)
    metrics.refresh(cfg)
    assert _value(cfg, "vmbatch_node_drained") == 0


def test_a_failed_drain_is_not_counted(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    policy.take_out(cfg, lambda: None, lambda r: policy.NodeMark("slurm", "n1", r, 1.0))
    metrics.refresh(cfg)
    assert _value(cfg, "vmbatch_node_drains_total") == 0


# -- the callers ------------------------------------------------------------------------


def test_the_accounting_line_counts_the_finished_job(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    rec = Record("9", "slurm", "alice", phase=READY, started=1.0, boot_seconds=12.5, image="d")
    ran = accounting.Marker(started=14.0)
    batch.write_accounting(cfg, "9", rec, accounting.JobEnd(exit_status=0), marker=ran)
    batch.write_accounting(cfg, "10", None, accounting.JobEnd(exit_status=2))  # no prologue
    fin = "vmbatch_jobs_finished_total"
    assert _value(cfg, fin, outcome="succeeded", cause="none") == 1
    assert _value(cfg, fin, outcome="failed", cause="no_prologue") == 1
    assert _value(cfg, "vmbatch_boot_duration_seconds_sum") == 12.5
    text = Path(cfg.metrics.textfile).read_text()
    assert "alice" not in text, "no user name in the metrics"


class _Restarter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, answers: Sequence[str | None]) -> None:
        self.answers = list(answers)
        monkeypatch.setattr(health, "check", lambda _cfg: self.answers.pop(0))
        monkeypatch.setattr(health.process, "run", lambda argv, **_: None)


def test_libvirtd_restarts_by_vmbatch_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, libvirt={"restart_command": ["/usr/local/sbin/restart"], "timeout": 2})
    _Restarter(monkeypatch, ["libvirtd does not answer", None])
    assert health.recover(cfg, "hung")
    _Restarter(monkeypatch, [None])
    assert health.recover(cfg, "answers again")  # no restart needed
    assert _value(cfg, "vmbatch_libvirtd_restarts_total") == 1


def test_cache_hits_misses_and_downloaded_bytes(tmp_path: Path) -> None:
    src_dir = tmp_path / "images"
    src_dir.mkdir()
    (src_dir / "demo.img").write_bytes(b"\0" * 4096)
    cfg = _cfg(
        tmp_path,
        cache={"image_dirs": [str(src_dir)]},
        images={"demo": {"source": f"file://{src_dir}/demo.img", "verify": False}},
    )
    cache = ImageCache(cfg)
    cache.ensure(cfg.images["demo"])
    cache.ensure(cfg.images["demo"])
    cache.ensure(cfg.images["demo"])
    assert _value(cfg, "vmbatch_image_cache_misses_total") == 1
    assert _value(cfg, "vmbatch_image_cache_hits_total") == 2
    assert _value(cfg, "vmbatch_image_download_bytes_total") == 4096
    assert _value(cfg, "vmbatch_image_cache_size_bytes") == 4096


def test_the_reaper_counts_what_it_removed_but_not_a_dry_run(tmp_path: Path) -> None:
    from vmbatch import reaper

    cfg = _cfg(tmp_path, libvirt={"uri": "test:///default"})
    stale = tmp_path / "users" / "77"
    stale.mkdir(parents=True)
    os.utime(stale, (1.0, 1.0))
    alive = reaper.Verdict(True, "asked nobody")
    dry = reaper.reap(cfg, scheduler_check=lambda _s, _j: alive, dry_run=True)
    assert len(dry.removed) == 1 and stale.exists()
    assert not metrics.state_path(cfg).exists(), "a dry run counts nothing"
    done = reaper.reap(cfg, scheduler_check=lambda _s, _j: alive)
    assert len(done.removed) == 1 and not stale.exists()
    assert _value(cfg, "vmbatch_orphans_reaped_total") == 1


# -- configuration ------------------------------------------------------------------------


def test_metrics_and_health_keys_are_checked() -> None:
    assert config.Config().metrics.textfile == "/var/lib/prometheus/node-exporter/vmbatch.prom"
    assert config.parse({"metrics": {"textfile": ""}}).metrics.textfile == ""
    with pytest.raises(ConfigError) as info:
        config.parse(
            {
                "metrics": {"textfile": "vmbatch.prom"},
                "health": {"timeout": 0, "libvirt_timeout": -1},
            }
        )
    text = str(info.value)
    assert '[metrics].textfile: must be "" (off) or an absolute path ending in .prom' in text
    assert "[health].timeout: must be > 0 and at most 300 seconds" in text
    assert "[health].libvirt_timeout: must be > 0 seconds" in text
    with pytest.raises(ConfigError, match=r"\[metrics\].textfile"):
        config.parse({"metrics": {"textfile": "/var/lib/x/vmbatch.txt"}})


def test_a_kept_job_whose_time_is_up_is_no_orphan(tmp_path: Path) -> None:
    """The reaper removes a job kept for inspection after [batch].keep_failed_for: that is
    the plan, not a leftover, and must not fire an orphans alert."""
    from vmbatch import reaper
    from vmbatch.hooks.jobstate import KEPT

    cfg = _cfg(tmp_path, libvirt={"uri": "test:///default"})
    StateStore(cfg.batch.state_dir).write(
        Record("55", "torque", "alice", phase=KEPT, kept_as="disks", kept_until=10.0,
               boot_id=reaper.state.boot_id(), started=1.0)
    )  # fmt: skip
    alive = reaper.Verdict(True, "asked nobody")
    done = reaper.reap(cfg, scheduler_check=lambda _s, _j: alive)
    assert [x for x in done.removed if "time is up" in x], done
    assert done.kept_expired == 1
    assert _value(cfg, "vmbatch_orphans_reaped_total") == len(done.removed) - 1
