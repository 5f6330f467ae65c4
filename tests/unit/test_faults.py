"""The fault-injection switch: points found in the source, armed only by root's config."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from vmbatch import config, faults
from vmbatch.errors import ConfigError
from vmbatch.hooks.jobstate import Record, StateStore
from vmbatch.images.cache import ImageCache

PACKAGE = Path(faults.__file__).resolve().parent
NOBODY = 65534


def test_every_hook_has_points_and_every_name_is_dotted() -> None:
    points = faults.registry()
    for prefix in ("prologue.", "start.", "starter.", "teardown.", "finish.", "image.", "inject."):
        assert any(name.startswith(prefix) for name in points), prefix
    assert all(faults.NAME.fullmatch(name) for name in points)
    assert points["prologue.recorded"].startswith("vmbatch/hooks/batch.py:")


def test_points_are_called_only_as_faults_point() -> None:
    """Another spelling (``from vmbatch.faults import point``) would escape the registry."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"from vmbatch\.faults import|import vmbatch\.faults", text), path
        assert not re.search(r"from vmbatch import [^\n]*\bfaults as\b", text), path
        if path.name != "faults.py":
            calls = re.findall(r"(\w+\.)?\bpoint\(", text)
            assert all(prefix == "faults." for prefix in calls), path


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("faults.point(cfg, name)\n", "needs the name as a string literal"),
        ('faults.point(cfg, "Bad Name")\n', "is not a dotted lower-case name"),
        ('faults.point(cfg, "a.b")\nfaults.point(cfg, "a.b")\n', "'a.b' is also at pkg/m.py:1"),
    ],
)
def test_scan_refuses_what_a_test_could_not_enumerate(
    tmp_path: Path, source: str, message: str
) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(source)
    with pytest.raises(ValueError, match=re.escape(message)):
        faults.scan(pkg)


def test_scan_lists_points_in_source_order(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        'def f():\n    faults.point(c, "z.first")\n\nfaults.point(c, "a.second")\n'
    )
    assert list(faults.scan(pkg).items()) == [("z.first", "pkg/m.py:2"), ("a.second", "pkg/m.py:4")]


class KilledError(Exception):
    pass


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        seen.append((pid, sig))
        raise KilledError  # the real one never returns

    monkeypatch.setattr(os, "kill", kill)
    return seen


def test_an_armed_point_kills_its_own_process(
    kills: list[tuple[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config.parse({"debug": {"fault_points": ["prologue.recorded"]}})
    faults.point(cfg, "prologue.locked")
    faults.point(None, "prologue.recorded")
    faults.point(config.Config(), "prologue.recorded")
    assert kills == []
    with pytest.raises(KilledError):
        faults.point(cfg.debug, "prologue.recorded")
    with pytest.raises(KilledError):
        faults.point(cfg, "prologue.recorded")
    assert kills == [(os.getpid(), signal.SIGKILL)] * 2
    assert "fault injection: SIGKILL at prologue.recorded" in caplog.text


def test_unknown_points_and_actions_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        config.parse({"debug": {"fault_points": ["prologue.recorde", "no.such"]}})
    text = str(err.value)
    assert "'prologue.recorde' is not a fault point (did you mean 'prologue.recorded'?)" in text
    assert "'no.such' is not a fault point" in text
    with pytest.raises(ConfigError, match="fault_action"):
        config.parse({"debug": {"fault_action": "stop"}})


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_only_roots_configuration_arms_points(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    etc.chmod(0o755)
    main = etc / "vmbatch.toml"
    main.write_text('[debug]\nfault_points = ["start.domain_created"]\n')
    main.chmod(0o644)
    assert config.load(main).debug.fault_points == ("start.domain_created",)
    # The same file as a user's: refused whoever loads it (the job starter runs as the user).
    os.chown(main, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="only root's configuration may arm fault points"):
        config.load(main)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        config.load(main, as_root=True)
    # A user's drop-in may not arm them either; without [debug] a user's file still loads.
    os.chown(main, 0, 0)
    main.write_text("")
    dropin = etc / "vmbatch.d"
    dropin.mkdir(mode=0o755)
    (dropin / "90-faults.toml").write_text('[debug]\nfault_points = ["prologue.locked"]\n')
    (dropin / "90-faults.toml").chmod(0o666)
    with pytest.raises(ConfigError, match="writable by others"):
        config.load(main)
    (dropin / "90-faults.toml").write_text("[vm]\nmemory = 512\n")
    assert config.load(main).vm.memory == 512


def test_epilogue_releases_the_marker_of_an_image_that_never_arrived(tmp_path: Path) -> None:
    """A prologue SIGKILLed mid-download leaves its marker beside a missing image."""
    cfg = config.parse({"paths": {"cache_dir": str(tmp_path)}})
    cache = ImageCache(cfg)
    cache.dir.mkdir()
    missing = cache.dir / "demo-0123456789abcdef.img"
    present = cache.dir / "other-0123456789abcdef.img"
    present.write_bytes(b"x")
    for path in (missing, present):
        cache.mark_used(path, "42")
        cache.mark_used(path, "43")
    cache.release_job("42")
    assert sorted(p.name for p in (missing.parent / (missing.name + ".jobs")).iterdir()) == ["43"]
    assert sorted(p.name for p in (present.parent / (present.name + ".jobs")).iterdir()) == ["43"]
    cache.release_job("43")
    assert not (missing.parent / (missing.name + ".jobs")).exists()
    assert (present.parent / (present.name + ".jobs")).is_dir()  # the image's own sidecar


def test_removing_a_record_also_removes_a_half_written_one(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.write(Record("7", "slurm", "alice"))
    killed = store.dir / ".7.json.12345.tmp"  # atomic_write's temp file, writer SIGKILLed
    killed.write_text("{")
    other = store.dir / ".70.json.12345.tmp"
    other.write_text("{")
    store.remove("7")
    assert sorted(p.name for p in store.dir.iterdir()) == [".70.json.12345.tmp"]
