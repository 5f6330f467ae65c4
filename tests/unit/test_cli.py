from __future__ import annotations

from pathlib import Path

import pytest

from vmbatch import cli


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "vmbatch.toml"
    f.write_text(text)
    return f


def test_config_check_lists_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = _write(tmp_path, '[vm]\nmemory = "x"\nvcpus = 0\n[bogus]\n')
    assert cli.main(["config", "check", str(f)]) == 69
    err = capsys.readouterr().err
    assert "error: [vm].memory: expected an integer" in err
    assert "error: [vm].vcpus: must be at least 1" in err
    assert "unknown section 'bogus'" in err
    assert "3 problem(s) found" in err


def test_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path, '[images.demo]\nsource = "/x.qcow2"\n')
    assert cli.main(["config", "check", str(f)]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_config_check_warns_that_injection_ignores_the_snippet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snippet = tmp_path / "site.yaml"
    snippet.write_text("packages: [htop]\n")
    f = _write(
        tmp_path,
        f'[context]\nsite_user_data = "{snippet}"\n'
        '[images.stock]\nsource = "/x.qcow2"\ncontext = "inject"\n'
        '[images.cloud]\nsource = "/y.qcow2"\n',
    )
    assert cli.main(["config", "check", str(f)]) == 0
    out = capsys.readouterr()
    assert 'not applied to images with context = "inject" (stock)' in out.err
    assert "configuration OK" in out.out


def test_config_check_names_an_unknown_context_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = _write(tmp_path, '[images.x]\nsource = "/x.qcow2"\ncontext = "amiconfig"\n')
    assert cli.main(["config", "check", str(f)]) == 69
    assert "[images.x].context: expected one of 'nocloud', 'cernvm', 'inject'" in (
        capsys.readouterr().err
    )


def test_run_unknown_image_is_one_clear_line_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = tmp_path / "jobs"
    f = _write(
        tmp_path,
        f'[paths]\njob_dir = "{jobs}"\n[vm]\naccel = "tcg"\n[images.demo]\nsource = "/x.qcow2"\n',
    )
    assert cli.main(["-c", str(f), "run", "--image", "nosuch", "--", "true"]) == 65
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "vmbatch: error: unknown image 'nosuch' (known images: demo;"
        " add [images.nosuch] to the configuration)"
    ]
    assert not jobs.exists()


def test_run_missing_image_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path, '[vm]\naccel = "tcg"\n[images.demo]\nsource = "/nonexistent.qcow2"\n')
    assert cli.main(["-c", str(f), "run", "--image", "demo", "--", "true"]) == 65
    assert "image 'demo' (/nonexistent.qcow2): file not found" in capsys.readouterr().err


def test_run_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--image", "demo"]) == 2
    assert "Missing argument" in capsys.readouterr().err


def test_unexpected_exception_is_never_success(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(cli.config, "load", boom)
    assert cli.main(["config", "check"]) == 70
    assert "internal error" in capsys.readouterr().err


def test_cleanup_stale_dry_run_says_when_there_is_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dry run that finds nothing says so (a real run stays quiet, for cron)."""
    f = _write(
        tmp_path,
        f'[libvirt]\nuri = "test:///default"\n[paths]\njob_dir = "{tmp_path}/jobs"\n'
        f'cache_dir = "{tmp_path}/cache"\n[batch]\nstate_dir = "{tmp_path}/state"\n'
        f'user_dir = "{tmp_path}/run"\n[metrics]\ntextfile = ""\n'
        f'[checkpoint]\ndir = "{tmp_path}/checkpoints"\n',
    )
    assert cli.main(["-c", str(f), "cleanup", "--stale", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "nothing stale: the reaper would remove nothing" in out.err
    assert cli.main(["-c", str(f), "cleanup", "--stale"]) == 0
    assert "nothing stale" not in capsys.readouterr().err
