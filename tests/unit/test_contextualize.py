from __future__ import annotations

import dataclasses
import io
import re
import shlex
import stat
import typing
from pathlib import Path

import paramiko
import pycdlib
import pytest
import yaml

from vmbatch import config
from vmbatch.config import ContextName
from vmbatch.contextualize import REGISTRY, ContextSpec, get_method, groups, sshd
from vmbatch.contextualize.keys import generate
from vmbatch.contextualize.nocloud import build_iso, load_site_user_data, meta_data, user_data
from vmbatch.errors import ConfigError, Disposition, JobError
from vmbatch.job import JobUser
from vmbatch.state import JobDir

ALICE = JobUser("alice", 4242, 4343, "physics", "/home/alice", (("atlas", 5000),))


def _spec(
    hostname: str = "vmbatch-42", user: JobUser | None = None, admin: bool = False
) -> ContextSpec:
    return ContextSpec(
        instance_id="vmbatch-42",
        hostname=hostname,
        user=user,
        authorized_keys=(generate("client").public_openssh,),
        host_key=generate("host"),
        admin_keys=(generate("admin").public_openssh,) if admin else (),
    )


def test_keys_are_usable_by_paramiko_and_never_printed() -> None:
    pair = generate("job 1; rm -rf /")
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(pair.private_openssh))
    assert pair.public_openssh.split()[1] == key.get_base64()
    assert pair.public_openssh.endswith(" job1rm-rf")
    assert "PRIVATE" not in repr(pair)


def test_user_data_is_cloud_config_with_pinned_host_key() -> None:
    spec = _spec()
    text = user_data(spec)
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["ssh_authorized_keys"] == list(spec.authorized_keys)
    assert data["ssh_keys"]["ed25519_private"] == spec.host_key.private_openssh
    assert data["ssh_keys"]["ed25519_public"] == spec.host_key.public_openssh
    assert data["ssh_pwauth"] is False and data["ssh_genkeytypes"] == ["ed25519"]
    assert data["disable_root"] is False  # no job user: root's debugging login
    # The tiny guest's init parses this layout: the private key as a literal block.
    assert "  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n" in text


def test_meta_data_with_odd_hostname_stays_yaml() -> None:
    data = yaml.safe_load(meta_data(_spec(hostname="a: b\n- c")))
    assert data == {"instance-id": "vmbatch-42", "local-hostname": "a: b\n- c"}


def test_iso_has_cidata_label_and_rock_ridge_names() -> None:
    image = build_iso({"user-data": b"#cloud-config\n", "meta-data": b"instance-id: x\n"})
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/user-data")
        assert out.getvalue() == b"#cloud-config\n"
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, joliet_path="/meta-data")
        assert out.getvalue() == b"instance-id: x\n"
    finally:
        iso.close()


def test_registry_matches_the_config_choices() -> None:
    assert set(REGISTRY) == set(typing.get_args(ContextName))
    cfg = config.parse({})
    assert {name: get_method(name, cfg).name for name in REGISTRY} == {n: n for n in REGISTRY}


def test_every_seed_method_attaches_read_only_volumes(tmp_path: Path) -> None:
    # "inject" writes into the overlay instead (tests/integration/test_inject.py).
    for name in ("nocloud", "cernvm"):
        method = get_method(name, config.parse({}))
        jobdir = JobDir(tmp_path, f"job-{name}").create()
        disks = method.prepare(_spec(), jobdir)
        assert disks and all(d.path.parent == jobdir.path for d in disks)
        for d in disks:
            assert d.readonly
            assert stat.S_IMODE(d.path.stat().st_mode) == 0o600


def test_user_data_creates_the_job_user_with_exact_ids_and_no_root_access() -> None:
    spec = _spec(user=ALICE)
    data = yaml.safe_load(user_data(spec))
    [entry] = data["users"]  # no "default": the image's default user gets no key
    assert entry == {
        "name": "alice",
        "uid": 4242,
        "primary_group": "4343",
        "create_groups": False,
        "homedir": "/home/alice",
        "shell": "/bin/bash",
        "lock_passwd": True,
        "ssh_authorized_keys": list(spec.authorized_keys),
    }  # no "groups": the boot script gives them (cloud-init would also give left-out ones)
    assert "ssh_authorized_keys" not in data  # nothing for root or the default user
    assert data["disable_root"] is True and data["ssh_pwauth"] is False
    assert data["bootcmd"] == [
        sshd.prepend_command(),  # first: see test_sshd_refuses_passwords_...
        groups.boot_script(groups.plan(ALICE)),  # run for real in tests/integration
    ]


def test_groups_script_gets_the_node_groups_but_no_privileged_one() -> None:
    user = dataclasses.replace(ALICE, groups=(("atlas", 5000), ("sudo", 27), ("lab", 5001)))
    spec = dataclasses.replace(_spec(user=user), privileged_groups=frozenset({"lab"}))
    text = user_data(spec)
    script = yaml.safe_load(text)["bootcmd"][1]
    calls = [ln for ln in script.splitlines() if ln.startswith("group ")]
    assert calls == ["group physics 4343 primary", "group atlas 5000 member"]
    privileged = shlex.split(next(ln for ln in script.splitlines() if ln.startswith("P=")))[0]
    assert {"sudo", "wheel", "docker", "adm", "lab"} <= set(privileged[2:].split())
    # A literal block: the tiny guest's init runs exactly those items of bootcmd.
    assert "\n- |-\n  (\n  " + groups.MARKER + "\n" in text
    assert "\t" not in script and not any(ln.endswith(" ") for ln in script.splitlines())


@pytest.mark.parametrize("user", [ALICE, None], ids=["job-user", "root-debug"])
def test_sshd_refuses_passwords_and_keyboard_interactive_in_the_seed(
    tmp_path: Path, user: JobUser | None
) -> None:
    # ssh_pwauth covers PasswordAuthentication only; the first bootcmd puts vmbatch's block
    # (shared with offline injection) at the top of sshd_config, before any Include.
    jobdir = JobDir(tmp_path, "job").create()
    [disk] = get_method("nocloud", config.parse({})).prepare(_spec(user=user), jobdir)
    iso = pycdlib.PyCdlib()
    iso.open(str(disk.path))
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/user-data")
    finally:
        iso.close()
    data = yaml.safe_load(out.getvalue())
    assert data["ssh_pwauth"] is False
    command = data["bootcmd"][0]
    assert command == sshd.prepend_command("/etc/ssh/sshd_config")
    for line in (
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "ChallengeResponseAuthentication no",
    ):
        assert line in sshd.AUTH_SETTINGS and f"'{line}'" in command
    # What the command writes is exactly what offline injection writes (run for real in
    # tests/integration/test_sshd.py); the file name and marker are quoted for sh.
    assert shlex.split(command)[:4] == ["if", "[", "-f", "/etc/ssh/sshd_config"]
    assert shlex.quote(sshd.MARKER) in command


def test_admin_key_goes_to_root_only_when_mounts_need_it() -> None:
    spec = _spec(user=ALICE, admin=True)
    data = yaml.safe_load(user_data(spec))
    alice, root = data["users"]
    assert alice["ssh_authorized_keys"] == list(spec.authorized_keys)  # not the admin key
    # cloud-init skips creating an existing account but installs its keys.
    assert root == {"name": "root", "lock_passwd": True, "ssh_authorized_keys": [*spec.admin_keys]}
    assert "ssh_authorized_keys" not in data and data["disable_root"] is True
    # Root as the login user (debugging): both keys are root's.
    debug = yaml.safe_load(user_data(_spec(admin=True)))
    assert len(debug["ssh_authorized_keys"]) == 2 and "users" not in debug


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("name", "al ice", "not a valid name"),
        ("name", "alice\nssh_pwauth: true", "not a valid name"),
        ("name", "$(reboot)", "not a valid name"),
        ("name", "-rf", "not a valid name"),
        ("name", "root", "'root' refused"),
        ("name", "a" * 33, "not a valid name"),
        ("uid", 0, "uid 0 (root) refused"),
        ("gid", 0, "gid 0 (root) refused"),
        ("uid", -5, "out of range"),
        ("uid", 2**32, "out of range"),
        ("uid", True, "not a number"),
        ("group", "wheel;id", "not a valid name"),
        ("home", "home/alice", "not a plain absolute path"),
        ("home", "/home/../etc", "not a plain absolute path"),
        ("home", "/home/al ice", "not a plain absolute path"),
        ("home", "/home/a\n- b", "not a plain absolute path"),
        ("groups", (("ok", 0),), "gid 0 (root) refused"),
        ("groups", (("x'y", 7),), "not a valid name"),
    ],
)
def test_hostile_identities_are_refused_with_a_reason(
    field: str, value: object, message: str
) -> None:
    fields = {
        "name": "alice",
        "uid": 4242,
        "gid": 4343,
        "group": "physics",
        "home": "/home/alice",
        "groups": (),
    }
    fields[field] = value
    with pytest.raises(JobError, match=re.escape(message)) as info:
        JobUser(**fields)  # type: ignore[arg-type]
    assert info.value.disposition is Disposition.ABORT_JOB


def test_host_user_lookup() -> None:
    with pytest.raises(JobError, match="does not exist on this node"):
        JobUser.from_host("no-such-user-here")
    with pytest.raises(JobError, match="'root' refused"):
        JobUser.from_host("root")
    nobody = JobUser.from_host("nobody")
    assert (nobody.uid, nobody.name) == (65534, "nobody")


def test_site_snippet_is_merged_after_ours() -> None:
    site = {"bootcmd": ["echo site"], "packages": ["htop"], "timezone": "Europe/Zurich"}
    spec = dataclasses.replace(_spec(user=ALICE), site_user_data=site)
    data = yaml.safe_load(user_data(spec))
    ours = yaml.safe_load(user_data(_spec(user=ALICE)))["bootcmd"]
    assert data["bootcmd"] == [*ours, "echo site"]  # after the groups and sshd settings
    assert (data["packages"], data["timezone"]) == (["htop"], "Europe/Zurich")
    assert [u["name"] for u in data["users"]] == ["alice"]


@pytest.mark.parametrize(
    "snippet,message",
    [
        ({"users": [{"name": "eve", "ssh_authorized_keys": ["ssh-ed25519 AAAA eve"]}]}, "'users'"),
        ({"ssh_authorized_keys": ["ssh-ed25519 AAAA eve"]}, "'ssh_authorized_keys'"),
        ({"ssh_pwauth": True}, "'ssh_pwauth'"),
        ({"chpasswd": {"list": "root:x"}}, "'chpasswd'"),
        ({"disable_root": False}, "'disable_root'"),
        ({"hostname": "other"}, "'hostname'"),
        ({"write_files": [{"path": "/root/.ssh/authorized_keys", "content": "k"}]}, ".ssh"),
        ({"write_files": [{"path": "/etc/ssh/sshd_config.d/x.conf"}]}, "sshd"),
        ({"write_files": [{"path": "/etc//./passwd"}]}, "passwd"),
        ({"write_files": [{"path": "/tmp/../etc/shadow"}]}, "shadow"),
        (["not", "a", "mapping"], "must be a YAML mapping"),
    ],
)
def test_site_snippet_cannot_touch_access(snippet: object, message: str, tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(yaml.safe_dump(snippet))
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_site_user_data(f)
    assert info.value.disposition is Disposition.OFFLINE_NODE


def test_site_snippet_file_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_site_user_data(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("packages: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site_user_data(bad)
