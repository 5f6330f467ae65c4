"""The groups boot script, run by real shells (dash, bash, busybox ash) on real files.

It must leave exactly what offline injection's :func:`vmbatch.contextualize.groups.apply`
leaves for the same image files (one set of rules, two writers), say the same notes, keep
each file's inode and mode, change nothing when run again (a reboot), and survive an
``etc`` path that needs quoting. The tiny guest's init must find it in real user-data.
"""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.shells import SHELLS
from tests.unit.test_groups import CASES, IMAGE_GROUP, IMAGE_GSHADOW, _plan
from vmbatch.contextualize import ContextSpec, groups
from vmbatch.contextualize.keys import generate
from vmbatch.contextualize.nocloud import user_data
from vmbatch.job import JobUser

ROOT = Path(__file__).resolve().parents[2]


def _shell(name: str) -> list[str]:
    argv = SHELLS[name]
    if not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]} is not installed")
    return argv


def _run(shell: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_shell(shell), "-c", script],
        env={"PATH": "/usr/bin:/bin"},  # busybox: its own applets come first anyway
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _etc(tmp_path: Path, gshadow: bool = True) -> Path:
    etc = tmp_path / "it's an $etc"
    etc.mkdir()
    (etc / "group").write_text(IMAGE_GROUP)
    (etc / "group").chmod(0o644)
    if gshadow:
        (etc / "gshadow").write_text(IMAGE_GSHADOW)
        (etc / "gshadow").chmod(0o640)
    return etc


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("case", CASES)
def test_boot_script_does_what_injection_does(tmp_path: Path, shell: str, case: str) -> None:
    etc = _etc(tmp_path)
    inodes = {f: (etc / f).stat().st_ino for f in ("group", "gshadow")}
    script = groups.boot_script(_plan(case), str(etc))
    res = _run(shell, script)
    assert res.returncode == 0, res.stderr
    group, gshadow, notes = groups.apply(_plan(case), IMAGE_GROUP, IMAGE_GSHADOW)
    assert (etc / "group").read_text() == group
    assert (etc / "gshadow").read_text() == gshadow
    assert res.stderr.splitlines() == [f"vmbatch: groups: {n}" for n in notes]
    for f, mode in (("group", 0o644), ("gshadow", 0o640)):
        st = (etc / f).stat()
        assert (st.st_ino, stat.S_IMODE(st.st_mode)) == (inodes[f], mode)
    assert sorted(p.name for p in etc.iterdir()) == ["group", "gshadow"]  # no temp files
    again = _run(shell, script)  # the guest booted again
    assert again.returncode == 0
    assert (etc / "group").read_text() == group and (etc / "gshadow").read_text() == gshadow


@pytest.mark.parametrize("shell", SHELLS)
def test_boot_script_without_gshadow_and_with_a_privileged_primary(
    tmp_path: Path, shell: str
) -> None:
    etc = _etc(tmp_path, gshadow=False)
    (etc / "group").write_text("root:x:0:\nsudo:x:27:")  # no final newline
    ok = groups.boot_script(_plan("new names and gids"), str(etc))
    assert _run(shell, ok).returncode == 0
    assert (etc / "group").read_text() == (
        "root:x:0:\nsudo:x:27:\nphysics:x:4343:\natlas:x:5000:alice\n"
    )
    assert not (etc / "gshadow").exists()
    # Primary gid 27 is the image's sudo: nothing is written, the error is on the console,
    # and the status stays 0 (the check after login refuses the job).
    user = JobUser("alice", 4242, 27, "mysql", "/home/alice", (("atlas", 5000),))
    res = _run(shell, groups.boot_script(groups.plan(user), str(etc)))
    assert res.returncode == 0
    assert "ERROR: the primary gid 27 (mysql on the node) is the image's privileged group sudo" in (
        res.stderr
    )


def test_tiny_guest_init_runs_exactly_the_groups_script(tmp_path: Path) -> None:
    """guests/tiny/init's bootcmd reader, run by busybox on real user-data with a site
    snippet: the literal-block items come out byte for byte, in order, one-liners not."""
    busybox = _shell("busybox")
    user = JobUser("alice", 4242, 4343, "physics", "/home/alice", (("atlas", 5000),))
    site = {"bootcmd": ["echo one-liner", "echo site\necho block"]}
    spec = ContextSpec("i", "h", user, ("ssh-ed25519 AAAA k",), generate("h"), site)
    text = user_data(spec)
    (tmp_path / "user-data").write_text(text)
    init = (ROOT / "guests" / "tiny" / "init").read_text()
    functions = re.search(r"^parse_bootcmd\(\) \{\n.*?^\}\n", init, re.S | re.M)
    assert functions is not None
    res = subprocess.run(
        [*busybox, "-c", functions.group(0) + 'parse_bootcmd "$1" "$2"', "sh",
         str(tmp_path / "user-data"), str(tmp_path / "cmd")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    items = yaml.safe_load(text)["bootcmd"]
    assert sorted(p.name for p in tmp_path.glob("cmd.*")) == ["cmd.1", "cmd.2"]
    assert (tmp_path / "cmd.1").read_text() == items[1] + "\n"  # the groups script
    assert (tmp_path / "cmd.2").read_text() == items[3] + "\n"  # the site's block
