"""``vmbatch report``: reading every format of the accounting log, the summary, the CLI."""

from __future__ import annotations

import gzip
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vmbatch import cli, report

NOW = 1_800_000_000.0


def _entry(job_id: str, t: float, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": 2,
        "time": t,
        "job_id": job_id,
        "scheduler": "slurm",
        "user": "alice",
        "image": "demo",
        "boot_seconds": 4.0,
        "script_ran": True,
        "run_seconds": 10.0,
        "exit_status": 0,
        "exit_signal": 0,
        "exit_source": "slurmctld",
        "cause": None,
        "qemu_cpu_seconds": 2.0,
        "qemu_peak_rss_mib": 100,
    }
    return {**base, **kw}


LINES = [
    _entry("1", NOW - 3600),
    _entry("2", NOW - 3000, exit_status=7, boot_seconds=6.0, run_seconds=1.0),
    _entry(
        "3",
        NOW - 2000,
        user="bob",
        script_ran=False,
        run_seconds=None,
        cause="cancelled during boot",
        boot_seconds=3.0,
    ),
    _entry(
        "4",
        NOW - 1000,
        user="bob",
        image="cloud",
        script_ran=False,
        run_seconds=None,
        boot_seconds=None,
        exit_status=65,
        cause="GuestBootTimeoutError: no SSH in 60 s",
        qemu_cpu_seconds=None,
    ),
    _entry("5", NOW - 500, exit_status=0, exit_signal=9, run_seconds=2.5),
    # format 1 (before issue 17): no format, script_ran, exit_signal, exit_source
    {
        "time": NOW - 100,
        "job_id": "6",
        "user": "carol",
        "image": "demo",
        "boot_seconds": 5.0,
        "run_seconds": 0.5,
        "exit_status": 143,
        "cause": None,
    },
    {
        "time": NOW - 50,
        "job_id": "7",
        "user": None,
        "image": None,
        "boot_seconds": None,
        "run_seconds": None,
        "exit_status": None,
        "cause": "no prologue state",
    },
]


def _log(tmp_path: Path, lines: list[dict[str, Any]] = LINES, tail: str = "") -> Path:
    path = tmp_path / "accounting.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)
    return path


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [report.percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert report.percentile([3.0], 99) == 3.0 and report.percentile([], 50) is None
    assert report.percentile([1.0, 2.0], 50) == 1.0


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("now", NOW),
        ("90s", NOW - 90),
        ("30m", NOW - 1800),
        ("2h", NOW - 7200),
        ("7d", NOW - 7 * 86400),
        ("1w", NOW - 7 * 86400),
        ("1.5h", NOW - 5400),
        ("@1700000000", 1_700_000_000.0),
        ("2026-11-30T09:00:00+00:00", 1_796_029_200.0),
        ("2026-11-30", datetime(2026, 11, 30).timestamp()),
    ],
)
def test_times_as_since_and_until_take_them(text: str, when: float) -> None:
    assert report.parse_when(text, NOW) == when


@pytest.mark.parametrize("text", ["yesterday", "5x", "", "@x", "2026-13-01"])
def test_a_bad_time_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a time"):
        report.parse_when(text, NOW)


def test_the_summary_counts_failures_by_cause_and_groups(tmp_path: Path) -> None:
    summary = report.summarise(report.read([_log(tmp_path)]))
    assert (summary["jobs"], summary["failed"], summary["script_ran"]) == (7, 6, 4)
    assert summary["failures_by_cause"] == {
        "GuestBootTimeoutError": 1,
        "cancelled during boot": 1,
        "exit status 143": 1,  # format 1 kept its shell-style status
        "exit status 7": 1,
        "no prologue state": 1,
        "signal 9": 1,
    }
    assert summary["boot_seconds"] == {"count": 5, "p50": 4.0, "p90": 6.0, "p99": 6.0, "max": 6.0}
    assert summary["images"]["demo"] == {
        "jobs": 5,
        "failed": 4,
        "boot_mean": 4.4,
        "boot_median": 4.0,
        "run_seconds_total": 14.0,
        "qemu_cpu_seconds_total": 8.0,
    }
    assert summary["images"]["(none)"]["jobs"] == 1
    assert summary["users"]["bob"]["failed"] == 2 and summary["users"]["carol"]["failed"] == 1
    assert summary["users"]["(unknown)"]["jobs"] == 1
    assert (summary["first"], summary["last"]) == (NOW - 3600, NOW - 50)


def test_old_lines_and_a_truncated_last_line_are_read(tmp_path: Path) -> None:
    path = _log(tmp_path, LINES[:1], tail='[1, 2]\n\n{"time": 1, "job_id": "x", "exi')
    records = report.read([path])
    assert len(records.jobs) == 1 and records.skipped == 2  # a list, and the cut line
    old = report.job_of({"job_id": "9", "run_seconds": 3.0, "exit_status": 0})
    assert (old.script_ran, old.failure, old.time) == (True, None, None)
    odd = report.job_of(
        {
            "format": 2,
            "job_id": 5,
            "time": "x",
            "boot_seconds": True,
            "exit_status": 1.5,
            "script_ran": "yes",
        }
    )
    assert (odd.job_id, odd.time, odd.boot_seconds, odd.exit_status, odd.script_ran) == (
        "?",
        None,
        None,
        None,
        None,
    )
    assert report.job_of({"format": 2, "script_ran": False}).failure == "script did not run"


def test_since_and_until_select_by_the_lines_time(tmp_path: Path) -> None:
    path = _log(tmp_path)
    assert [j.job_id for j in report.read([path], NOW - 2000, NOW - 400).jobs] == ["3", "4", "5"]
    assert report.read([path], NOW + 1).jobs == []
    no_time = tmp_path / "no-time.jsonl"
    no_time.write_text('{"job_id": "1"}\n')
    assert report.read([no_time], since=0).jobs == [] and len(report.read([no_time]).jobs) == 1


def test_text_report(tmp_path: Path) -> None:
    result = _run("report", "--file", str(_log(tmp_path)))
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"accounting: {tmp_path / 'accounting.jsonl'}\n" in out
    assert "jobs: 7  failed: 6  script ran: 4  (" in out
    assert "boot seconds: p50 4.0  p90 6.0  p99 6.0  max 6.0  (n=5)\n" in out
    assert "failures by cause:\n      1  GuestBootTimeoutError\n" in out
    assert "\nIMAGE    JOBS FAILED BOOT-MEAN BOOT-MEDIAN RUN-TOTAL-S QEMU-CPU-S\n" in out
    assert "\ncloud       1      1         -           -         0.0        0.0\n" in out
    assert "\ndemo        5      4       4.4         4.0        14.0        8.0\n" in out
    assert "\nbob            2      2       3.0         3.0         0.0        2.0\n" in out


def test_json_report_with_since_and_until(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW)
    path = _log(tmp_path)
    result = _run(
        "report", "--json", "--since", "35m", "--until", "@1799999550", "--file", str(path)
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["jobs"] == 3 and summary["files"] == [str(path)]  # jobs 3, 4 and 5
    assert summary["failures_by_cause"] == {
        "GuestBootTimeoutError": 1,
        "cancelled during boot": 1,
        "signal 9": 1,
    }


def test_several_files_and_gzip(tmp_path: Path) -> None:
    old = tmp_path / "accounting.jsonl.2.gz"
    with gzip.open(old, "wt") as fh:
        fh.write(json.dumps(_entry("0", NOW - 9000)) + "\n")
    cut = tmp_path / "accounting.jsonl.3.gz"
    cut.write_bytes(gzip.compress(b'{"format": 2, "job_id": "c", "time": 1}\n' * 50)[:-20])
    result = _run(
        "report", "--json", "--file", str(old), "--file", str(_log(tmp_path)), "--file", str(cut)
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["jobs"] >= 8


def test_unreadable_lines_are_counted_and_said(tmp_path: Path) -> None:
    result = _run("report", "--file", str(_log(tmp_path, LINES[:2], tail="not json\n{")))
    assert result.exit_code == 0
    assert "vmbatch: 2 unreadable line(s) skipped" in result.output
    assert "skipped: 2 unreadable line(s)" in result.output


def test_an_empty_log_is_a_report_of_no_jobs(tmp_path: Path) -> None:
    result = _run("report", "--file", str(_log(tmp_path, [])))
    assert result.exit_code == 0
    assert "jobs: 0  failed: 0  script ran: 0  (- to -)" in result.output
    assert "boot seconds: p50 -  p90 -  p99 -  max -  (n=0)" in result.output


def test_the_default_file_is_the_configured_log(tmp_path: Path) -> None:
    log = _log(tmp_path)
    conf = tmp_path / "vmbatch.toml"
    conf.write_text(f'[batch]\naccounting_log = "{log}"\n')
    result = _run("-c", str(conf), "report", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files"] == [str(log)]


def test_a_missing_log(tmp_path: Path) -> None:
    result = _run("report", "--file", str(tmp_path / "none.jsonl"))
    assert result.exit_code == 66
    assert f"vmbatch: error: {tmp_path / 'none.jsonl'}: no such accounting log" in result.output


@pytest.mark.parametrize(
    ("error", "status", "text"),
    [
        (PermissionError(13, "Permission denied", "/var/log/a"), 77, "not allowed to read it"),
        (IsADirectoryError(21, "Is a directory", "/var/log/a"), 74, "Is a directory"),
    ],
)
def test_a_log_that_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, status: int, text: str
) -> None:
    def refuse(*a: object) -> report.Records:
        raise error

    monkeypatch.setattr(report, "read", refuse)
    result = _run("report", "--file", str(_log(tmp_path)))
    assert result.exit_code == status
    assert f"vmbatch: error: /var/log/a: {text}" in result.output


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_bad_time_option_is_a_usage_error(tmp_path: Path, option: str) -> None:
    result = _run("report", option, "last tuesday", "--file", str(_log(tmp_path)))
    assert result.exit_code == 2
    assert f"Invalid value for {option}: 'last tuesday' is not a time" in result.output


def test_a_directory_as_file_is_a_usage_error(tmp_path: Path) -> None:
    result = _run("report", "--file", str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in result.output


def test_help_names_every_option_exit_status_and_an_example() -> None:
    result = _run("report", "--help")
    assert result.exit_code == 0
    for text in (
        "--since WHEN",
        "--until WHEN",
        "--json",
        "--file PATH",
        "66",
        "77",
        "vmbatch report --since 7d --json",
    ):
        assert text in result.output, text
