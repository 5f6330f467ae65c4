"""Offline injection's account editing and sshd settings (pure functions, no appliance)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbatch import process
from vmbatch.contextualize import sshd
from vmbatch.contextualize.inject import (
    TAG_FILE,
    add_account,
    hosts_file,
    sshd_config,
    stop_leftovers,
)
from vmbatch.errors import Disposition, ImageError
from vmbatch.job import JobUser
from vmbatch.state import JobDir

ALICE = JobUser("alice", 4242, 4343, "physics", "/home/alice", (("atlas", 5000), ("audio", 29)))
PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n"  # noqa: S105
GROUP = "root:x:0:\nshadow:x:42:\naudio:x:29:pulse\nphysics:x:9999:\n"
SHADOW = "root:*:19000:0:99999:7:::\n"
GSHADOW = "root:*::\nshadow:*::\naudio:*::pulse\nphysics:!::\n"


def _lines(text: str | None) -> list[list[str]]:
    assert text is not None
    return [ln.split(":") for ln in text.splitlines()]


def test_account_is_added_with_exact_ids_and_locked_password() -> None:
    passwd, group, shadow, gshadow = add_account(ALICE, PASSWD, GROUP, SHADOW, GSHADOW, 20000)
    assert _lines(passwd)[-1] == ["alice", "x", "4242", "4343", "", "/home/alice", "/bin/bash"]
    assert _lines(shadow)[-1] == ["alice", "!", "20000", "0", "99999", "7", "", "", ""]
    groups = {g[2]: g for g in _lines(group)}
    # 4343 is new, but "physics" is taken by gid 9999: the fallback name is used.
    assert groups["4343"] == ["vmbatch-g4343", "x", "4343", ""]
    assert groups["5000"] == ["atlas", "x", "5000", "alice"]
    assert groups["29"] == ["audio", "x", "29", "pulse,alice"]  # existing gid: member added
    assert groups["9999"] == ["physics", "x", "9999", ""]  # untouched
    gsh = {g[0]: g for g in _lines(gshadow)}
    assert gsh["audio"] == ["audio", "*", "", "pulse,alice"]
    assert gsh["atlas"] == ["atlas", "!", "", "alice"]
    assert gsh["vmbatch-g4343"] == ["vmbatch-g4343", "!", "", ""]
    # The image's own entries are kept as they were.
    assert passwd.startswith(PASSWD) and shadow is not None and shadow.startswith(SHADOW)


def test_images_without_shadow_files_get_a_locked_passwd_field() -> None:
    passwd, group, shadow, gshadow = add_account(ALICE, PASSWD, "root::0:\n", None, None, 1)
    assert _lines(passwd)[-1][1] == "!"
    assert shadow is None and gshadow is None
    assert ["physics", "x", "4343", ""] in _lines(group)


def test_injecting_twice_changes_nothing() -> None:
    once = add_account(ALICE, PASSWD, GROUP, SHADOW, GSHADOW, 1)
    assert add_account(ALICE, *once, 1) == once  # type: ignore[arg-type]


def test_existing_account_with_other_ids_is_refused() -> None:
    passwd = PASSWD + "alice:x:1000:1000::/home/alice:/bin/sh\n"
    with pytest.raises(ImageError, match=r"'alice' with uid/gid 1000/1000.*4242/4343") as info:
        add_account(ALICE, passwd, GROUP, SHADOW, GSHADOW, 1)
    assert info.value.disposition is Disposition.ABORT_JOB


@pytest.mark.parametrize(
    "passwd,group",
    [("root:x:0:0\n", GROUP), (PASSWD, "root\n"), ("garbage\n", GROUP)],
)
def test_malformed_account_files_are_refused(passwd: str, group: str) -> None:
    with pytest.raises(ImageError, match="malformed"):
        add_account(ALICE, passwd, group, SHADOW, GSHADOW, 1)


def test_sshd_settings_come_first_and_refuse_passwords_and_root() -> None:
    original = "Include /etc/ssh/sshd_config.d/*.conf\nPasswordAuthentication yes\n"
    text = sshd_config(original, ALICE)
    first = {}
    for line in text.splitlines():  # sshd keeps the first value of each keyword
        parts = line.split(None, 1)
        if len(parts) == 2 and not line.startswith("#"):
            first.setdefault(parts[0].lower(), parts[1])
    assert first["passwordauthentication"] == "no"
    assert first["kbdinteractiveauthentication"] == "no"
    assert first["challengeresponseauthentication"] == "no"  # OpenSSH < 8.7: kbd-int again
    assert first["permitrootlogin"] == "no"
    assert first["hostkey"] == "/etc/ssh/ssh_host_ed25519_key"
    assert text.startswith(sshd.MARKER + "\n") and text.endswith("\n\n" + original)
    assert all(s in text for s in sshd.AUTH_SETTINGS)
    assert "PermitRootLogin prohibit-password" in sshd_config("", None)  # root-debug mode
    # [mounts]: vmbatch logs in as root with its own key (root's file holds only that key).
    assert "PermitRootLogin prohibit-password" in sshd_config("", ALICE, admin=True)


def test_hosts_file_names_the_job_host_once() -> None:
    text = hosts_file("127.0.0.1 localhost\n127.0.1.1 old-name\n", "vmbatch-42")
    assert text == "127.0.0.1 localhost\n127.0.1.1\tvmbatch-42\n"


def test_teardown_reads_only_well_formed_appliance_tags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jobdir = JobDir(tmp_path, "t").create()
    for work, text in (("inject-a", "../../etc\n"), ("inject-b", process.new_tag() + "\n")):
        (jobdir.path / work).mkdir()
        (jobdir.path / work / TAG_FILE).write_text(text)
    (jobdir.path / "elsewhere").mkdir()
    (jobdir.path / "elsewhere" / TAG_FILE).write_text("not looked at\n")
    assert stop_leftovers(jobdir) == []  # the well-formed tag's appliance is gone already
    assert "inject-a/appliance.tag: not a process tag" in caplog.text
    assert "elsewhere" not in caplog.text
