"""The job's groups: read from the node's databases, given in the guest by the rules of
vmbatch.contextualize.groups (the Python side; the boot script runs for real in
tests/integration/test_groups_script.py against the same cases)."""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
from typing import Any

import pytest

from vmbatch import lifecycle
from vmbatch.contextualize import groups
from vmbatch.contextualize.inject import add_account
from vmbatch.errors import Disposition, ImageError, JobError
from vmbatch.job import JobUser

ALICE = JobUser("alice", 4242, 4343, "physics", "/home/alice", (("atlas", 5000),))
#: An image's /etc/group with the kinds of clash the rules handle.
IMAGE_GROUP = "root:x:0:\nsudo:x:27:\ndialout:x:20:\nusers:x:100:\ndocker:x:998:\n"
IMAGE_GSHADOW = "root:*::\nsudo:*::\ndialout:*::\nusers:*::\ndocker:!::\n"


def _node(monkeypatch: pytest.MonkeyPatch, primary: tuple[str | None, int], **gids: Any) -> None:
    """A node where user ``alice`` has ``primary`` and the groups ``gids`` (name -> gid;
    a name of None: the gid has no group entry)."""
    names = {gid: name for name, gid in gids.items()} | {primary[1]: primary[0]}
    names = {gid: (None if str(name).startswith("NONAME") else name) for gid, name in names.items()}

    def getgrgid(gid: int) -> Any:
        if names.get(gid) is None:
            raise KeyError(gid)
        return grp.struct_group((names[gid], "x", gid, []))

    def getpwnam(name: str) -> Any:
        if name != "alice":
            raise KeyError(name)
        return pwd.struct_passwd(("alice", "x", 4242, primary[1], "", "/home/alice", "/bin/sh"))

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(grp, "getgrgid", getgrgid)
    # getgrouplist(3): the primary gid first, then the others; a gid may repeat.
    listed = [primary[1], *gids.values(), *gids.values()]
    monkeypatch.setattr(os, "getgrouplist", lambda user, gid: listed)


def test_groups_come_from_the_nodes_group_list(monkeypatch: pytest.MonkeyPatch) -> None:
    _node(monkeypatch, ("physics", 4343), atlas=5000, sudo=27)
    user = JobUser.from_host("alice")
    assert (user.group, user.gid) == ("physics", 4343)
    assert user.groups == (("atlas", 5000), ("sudo", 27))  # privileged: decided by plan()


@pytest.mark.parametrize(
    "name,why",
    [
        ("domain users", "not a portable group name"),
        ("a;reboot", "not a portable group name"),
        ("$(id)", "not a portable group name"),
        ("g" * 33, "not a portable group name"),
        ("-x", "not a portable group name"),
        ("NONAME", "has no name on this node"),
    ],
)
def test_odd_node_groups_are_left_out_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, name: str, why: str
) -> None:
    _node(monkeypatch, ("physics", 4343), atlas=5000, **{name: 6000})
    with caplog.at_level(logging.WARNING):
        user = JobUser.from_host("alice")
    assert user.groups == (("atlas", 5000),)
    assert why in caplog.text and "6000" in caplog.text


def test_root_group_is_never_given(monkeypatch: pytest.MonkeyPatch) -> None:
    _node(monkeypatch, ("physics", 4343), root=0)
    assert JobUser.from_host("alice").groups == ()


def test_primary_group_without_a_usable_name_keeps_its_gid(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _node(monkeypatch, ("Domain Users", 4343))
    user = JobUser.from_host("alice")
    assert (user.group, user.gid) == ("vmbatch-g4343", 4343)
    assert "'Domain Users'" in caplog.text
    _node(monkeypatch, ("root", 0))
    with pytest.raises(JobError, match=r"gid 0 \(root\) refused"):
        JobUser.from_host("alice")


def test_plan_leaves_out_privileged_names_builtin_and_site() -> None:
    user = dataclasses.replace(
        ALICE, groups=(("atlas", 5000), ("sudo", 27), ("docker", 998), ("lab", 5001))
    )
    plan = groups.plan(user, ["lab"])
    assert plan.members == (("atlas", 5000),)
    assert plan.skipped == (("sudo", 27), ("docker", 998), ("lab", 5001))
    assert plan.primary == ("physics", 4343) and plan.user == "alice"
    assert groups.plan(user).members == (("atlas", 5000), ("lab", 5001))


#: (node groups, expected image group lines afterwards, notes) for rules 2 and 3.
CASES = {
    "new names and gids": (
        (("physics", 4343), [("atlas", 5000)]),
        ["physics:x:4343:", "atlas:x:5000:alice"],
        [],
    ),
    "same name and gid as the image": (
        (("users", 100), [("dialout", 20)]),
        ["dialout:x:20:alice"],  # primary: no member line; changed in place
        [],
    ),
    "gid taken by another name": (
        (("physics", 4343), [("modem", 20)]),
        ["dialout:x:20:alice", "physics:x:4343:"],
        ["gid 20 is dialout in the image (modem on the node): the image's name is kept"],
    ),
    "gid is a privileged group of the image": (
        (("physics", 4343), [("mysql", 27)]),
        ["sudo:x:27:", "physics:x:4343:"],
        ["not given: gid 27 (mysql on the node) is the image's privileged group sudo"],
    ),
    "name taken by another gid": (
        (("physics", 4343), [("users", 5100)]),
        ["users:x:100:", "vmbatch-g5100:x:5100:alice"],
        [
            "gid 5100 (users on the node) is vmbatch-g5100 in the guest: users is privileged"
            " or another gid's name"
        ],
    ),
    "privileged primary name, gid free in the image": (
        (("staff", 4343), []),
        ["vmbatch-g4343:x:4343:"],
        [
            "gid 4343 (staff on the node) is vmbatch-g4343 in the guest: staff is privileged"
            " or another gid's name"
        ],
    ),
}


def _plan(case: str) -> groups.GroupPlan:
    (primary, members), _, _ = CASES[case]
    user = JobUser("alice", 4242, primary[1], primary[0], "/home/alice", tuple(members))
    return groups.plan(user)


@pytest.mark.parametrize("case", CASES)
def test_apply_gives_groups_by_the_rules(case: str) -> None:
    _, expected, notes = CASES[case]
    group, gshadow, said = groups.apply(_plan(case), IMAGE_GROUP, IMAGE_GSHADOW)
    lines = group.splitlines()
    assert all(line in lines for line in expected), lines
    assert said == notes
    assert group.startswith("root:x:0:\n")
    assert gshadow is not None and len(gshadow.splitlines()) == len(lines)
    # Idempotent: the guest may boot again.
    assert groups.apply(_plan(case), group, gshadow)[:2] == (group, gshadow)


def test_apply_without_gshadow_still_writes_a_password_field() -> None:
    group, gshadow, _ = groups.apply(_plan("new names and gids"), "root::0:\n", None)
    assert gshadow is None
    assert group == "root::0:\nphysics:x:4343:\natlas:x:5000:alice\n"  # busybox needs the x


def test_primary_gid_privileged_in_the_image_refuses_the_job() -> None:
    user = JobUser("alice", 4242, 27, "mysql", "/home/alice")
    with pytest.raises(JobError, match=r"primary group mysql \(gid 27\).*'sudo'") as info:
        groups.apply(groups.plan(user), IMAGE_GROUP, None)
    assert info.value.disposition is Disposition.ABORT_JOB
    assert not isinstance(info.value, ImageError)  # not the image's fault: no cool-off
    with pytest.raises(JobError, match="primary group"):
        add_account(user, "root:x:0:0::/root:/bin/sh\n", IMAGE_GROUP, None, None, 1)


def test_injection_uses_the_site_list() -> None:
    user = dataclasses.replace(ALICE, groups=(("atlas", 5000), ("dialout", 20)))
    _, group, _, _ = add_account(
        user, "root:x:0:0::/root:/bin/sh\n", IMAGE_GROUP, None, None, 1, ["dialout"]
    )
    assert "dialout:x:20:\n" in group and "atlas:x:5000:alice\n" in group


# -- after login -------------------------------------------------------------------------


def _identity(primary: str, names: str, gids: str = "4343 5000") -> str:
    return f"4242\n4343\n{primary}\n{gids}\n{names}\n"


def test_check_identity_accepts_the_jobs_account(caplog: pytest.LogCaptureFixture) -> None:
    plan = groups.plan(ALICE)
    with caplog.at_level(logging.INFO):
        lifecycle.check_identity(0, _identity("physics", "physics atlas"), plan, ALICE, "img")
    assert "groups physics atlas" in caplog.text and "not given" not in caplog.text
    # A group the guest left out (rule 2) is logged, not refused.
    lifecycle.check_identity(0, _identity("physics", "physics", "4343"), plan, ALICE, "img")
    assert "gid(s) 5000 of alice are not given in the guest" in caplog.text


@pytest.mark.parametrize(
    "output,message",
    [
        (_identity("sudo", "sudo atlas"), r"primary group physics \(gid 4343\).*'sudo'"),
        (_identity("physics", "physics atlas docker"), "privileged group\\(s\\) docker"),
        ("1000\n4343\nphysics\n4343\nphysics\n", "uid/gid 1000/4343, expected 4242/4343"),
        ("", r"uid/gid \?/\?"),
    ],
)
def test_check_identity_refuses_wrong_ids_and_privileged_groups(output: str, message: str) -> None:
    with pytest.raises(JobError, match=message):
        lifecycle.check_identity(0, output, groups.plan(ALICE), ALICE, "img")
