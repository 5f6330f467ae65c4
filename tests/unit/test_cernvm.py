"""The CernVM/HEPiX context, checked field by field against the documented formats.

The readers are modelled on their public code (see vmbatch/contextualize/cernvm.py): amiconfig
keeps, after the first ``[section]``, only section and ``key=value``/``key: value`` lines
before ConfigParser; µCernVM takes the lines between exact ``[ucernvm-begin]`` and
``[ucernvm-end]`` lines of the raw text; HEPiX/OpenNebula readers source ``context.sh``
with sh (cloud-init with ``sh -e``) and base64-decode ``EC2_USER_DATA``/``USER_DATA``.
"""

from __future__ import annotations

import base64
import configparser
import dataclasses
import email
import io
import re
import shlex
import stat
from email.message import Message
from pathlib import Path

import pycdlib
import pytest
import yaml

from vmbatch import config
from vmbatch.contextualize import cernvm, nocloud, sshd
from vmbatch.contextualize.base import ContextSpec
from vmbatch.contextualize.cernvm import CernVM, CernvmOptions
from vmbatch.contextualize.keys import generate
from vmbatch.errors import ConfigError
from vmbatch.job import JobUser
from vmbatch.state import JobDir

ALICE = JobUser("alice", 4242, 4343, "physics", "/home/alice", (("atlas", 5000),))
OPTS = CernvmOptions(
    repositories=("atlas.cern.ch", "sft.cern.ch"),
    http_proxy="http://squid.example.org:3128;DIRECT",
    organisations=("atlas",),
)


def _spec(hostname: str = "vmbatch-42", user: JobUser | None = ALICE) -> ContextSpec:
    return ContextSpec(
        instance_id="vmbatch-42",
        hostname=hostname,
        user=user,
        authorized_keys=(generate("client").public_openssh,),
        host_key=generate("host"),
        site_user_data={"packages": ["htop"]},
    )


def _parts(text: str) -> list[Message]:
    msg = email.message_from_string(text)
    assert msg.get_content_type() == "multipart/mixed"
    return [p for p in msg.walk() if not p.is_multipart()]


def amiconfig_view(raw: str) -> configparser.RawConfigParser:
    """What amiconfig's INIFileStub.sanitize + ConfigParser make of the raw user-data."""
    kept: list[str] = []
    started = False
    parser = configparser.RawConfigParser(strict=False)
    for line in raw.split("\n"):
        if parser.SECTCRE.match(line):
            started = True
            kept.append(line)
        elif started and parser.OPTCRE.match(line):
            kept.append(line)
    parser.read_string("\n".join(kept) + "\n")
    return parser


def ucernvm_view(raw: str) -> dict[str, str]:
    """What µCernVM's parse_user_data takes: lines of the first exact begin/end block."""
    lines = raw.split("\n")
    start = lines.index("[ucernvm-begin]")
    end = lines.index("[ucernvm-end]", start)
    return dict(line.split("=", 1) for line in lines[start + 1 : end])


def test_parts_order_types_and_encoding() -> None:
    spec = _spec()
    text = cernvm.user_data(spec, OPTS)
    parts = _parts(text)
    assert [p.get_content_type() for p in parts] == [
        "text/cloud-config",
        "text/amiconfig-user-data",
        "text/ucernvm",
    ]
    for p in parts:
        assert p["Content-Transfer-Encoding"] == "7bit"
        assert p.get_content_charset() == "us-ascii"
        assert p.get_content_disposition() == "attachment"
    assert "\r" not in text and text.isascii()
    # The cloud-config part is exactly the NoCloud document (users, keys, site snippet).
    cloud = parts[0].get_payload()
    assert cloud == nocloud.user_data(spec)
    data = yaml.safe_load(cloud)
    assert data["users"][0]["uid"] == 4242 and data["packages"] == ["htop"]


def test_amiconfig_part_fields() -> None:
    text = cernvm.user_data(_spec(), OPTS)
    ini = amiconfig_view(text)
    assert ini.get("amiconfig", "plugins").split() == ["cernvm", "hostname"]
    assert ini.get("cernvm", "repositories") == "atlas.cern.ch,sft.cern.ch"
    assert ini.get("cernvm", "proxy") == "http://squid.example.org:3128;DIRECT"
    assert ini.get("cernvm", "organisations") == "atlas"
    assert ini.get("cernvm", "shell") == "/bin/bash"
    assert ini.get("hostname", "hostname") == "vmbatch-42"
    # No account is made by amiconfig (no uid, wheel, random password): cloud-init does it.
    assert not ini.has_option("cernvm", "users")
    # The YAML before the first section never reaches amiconfig.
    assert not any(ini.has_option(s, "ssh_keys") for s in ini.sections())
    assert not any(ini.has_option(s, "users") for s in ini.sections())


def test_amiconfig_part_without_options_or_user() -> None:
    ini = amiconfig_view(cernvm.amiconfig(_spec(user=None), CernvmOptions()))
    assert ini.items("cernvm") == []
    assert cernvm.ucernvm(CernvmOptions()) is None
    kinds = [p.get_content_type() for p in _parts(cernvm.user_data(_spec(), CernvmOptions()))]
    assert kinds == ["text/cloud-config", "text/amiconfig-user-data"]


def test_ucernvm_block_is_plain_text_and_quoted_for_sh() -> None:
    text = cernvm.user_data(_spec(), OPTS)
    block = ucernvm_view(text)
    assert block == {"cvmfs_http_proxy": '"http://squid.example.org:3128;DIRECT"'}
    # The bootloader sources "_UCONTEXT_KEY=value" with sh: the ';' must stay in one word
    # (shlex in POSIX mode follows sh's quoting rules; the guest test sources it for real).
    words = shlex.split(f"_UCONTEXT_CVMFS_HTTP_PROXY={block['cvmfs_http_proxy']}")
    assert words == [f"_UCONTEXT_CVMFS_HTTP_PROXY={OPTS.http_proxy}"]


def _source(context_sh: str, *names: str, tmp_path: Path) -> list[str]:
    """The values sh would assign: every line must be exactly one ``NAME=value`` word."""
    values: dict[str, str] = {}
    for line in context_sh.splitlines()[1:]:
        [word] = shlex.split(line, comments=True)
        name, value = word.split("=", 1)
        values[name] = value
    return [values[n] for n in names]


def test_context_sh_fields(tmp_path: Path) -> None:
    spec = _spec()
    data = cernvm.user_data(spec, OPTS)
    text = cernvm.context_sh(spec, data)
    lines = text.splitlines()
    assert lines[0] == "# Context variables generated by vmbatch"
    assert all(re.fullmatch(r"[A-Z0-9_]+='[^'\n]*'", ln) for ln in lines[1:])  # OpenNebula
    ec2, user, enc, one, host = _source(
        text, "EC2_USER_DATA", "USER_DATA", "USERDATA_ENCODING", "ONE_CONTEXT_PATH",
        "SET_HOSTNAME", tmp_path=tmp_path,
    )  # fmt: skip
    assert base64.b64decode(ec2).decode() == data
    assert (user, enc, one, host) == (ec2, "base64", "/var/lib/amiconfig", "vmbatch-42")
    # Nothing that would put a key into root's (or an agent-made user's) account.
    names = {ln.split("=", 1)[0] for ln in lines[1:]}
    assert not names & {"PUBLIC_KEY", "ROOT_PUBKEY", "SSH_PUBLIC_KEY", "EC2_PUBLIC_KEY",
                        "USERNAME", "PASSWORD", "START_SCRIPT"}  # fmt: skip


@pytest.mark.parametrize("hostname", ["a'b", "x$(reboot)`id`", "h; rm -rf /", "'"])
def test_context_sh_quotes_hostile_values(hostname: str, tmp_path: Path) -> None:
    spec = _spec(hostname=hostname)
    text = cernvm.context_sh(spec, "x")
    assert _source(text, "SET_HOSTNAME", tmp_path=tmp_path) == [hostname]
    assert len(text.splitlines()) == 6


@pytest.mark.parametrize("hostname", ["a\nb", "a\rb", "h\x00", "höst"])
def test_values_that_could_add_lines_are_refused(hostname: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        cernvm.context_sh(_spec(hostname=hostname), "x")
    with pytest.raises(ValueError, match="unsafe"):
        cernvm.amiconfig(_spec(hostname=hostname), OPTS)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("cvmfs_http_proxy", "http://p:3128\nusers=eve:wheel:x", "proxy notation"),
        ("cvmfs_http_proxy", 'http://p:3128"; reboot; "', "proxy notation"),
        ("cvmfs_http_proxy", "http://p:3128 DIRECT", "proxy notation"),
        ("cvmfs_http_proxy", "$(id)", "proxy notation"),
        ("cvmfs_repositories", ["atlas.cern.ch,users=eve"], "repository name"),
        ("cvmfs_repositories", ["atlas\n[cernvm]"], "repository name"),
        ("cernvm_organisations", ["atlas users"], "plain name"),
    ],
)
def test_hostile_cernvm_settings_are_config_errors(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.parse({"context": {key: value}})


def test_prepare_writes_context_cd_and_nocloud_volume(tmp_path: Path) -> None:
    cfg = config.parse(
        {"context": {"cvmfs_repositories": ["atlas.cern.ch"], "cvmfs_http_proxy": "DIRECT"}}
    )
    spec = dataclasses.replace(_spec(), site_user_data={})
    jobdir = JobDir(tmp_path, "job-cernvm").create()
    disks = CernVM(cfg).prepare(spec, jobdir)
    assert [d.path.name for d in disks] == ["context.iso", "seed.iso"]
    assert all(d.readonly and d.format == "raw" for d in disks)
    files = {}
    for d in disks:
        assert stat.S_IMODE(d.path.stat().st_mode) == 0o600
        iso = pycdlib.PyCdlib()
        iso.open(str(d.path))
        try:
            label = iso.pvd.volume_identifier.rstrip(b" ").decode()
            for name in ("context.sh", "user-data", "meta-data"):
                out = io.BytesIO()
                try:
                    iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
                except pycdlib.pycdlibexception.PyCdlibInvalidInput:
                    continue
                files[(label, name)] = out.getvalue().decode()
        finally:
            iso.close()
    assert set(files) == {
        ("CONTEXT", "context.sh"),
        ("CONTEXT", "user-data"),
        ("cidata", "user-data"),
        ("cidata", "meta-data"),
    }
    data = files[("CONTEXT", "user-data")]
    assert files[("cidata", "user-data")] == data
    assert amiconfig_view(data).get("cernvm", "repositories") == "atlas.cern.ch"
    assert ucernvm_view(data) == {"cvmfs_http_proxy": '"DIRECT"'}
    ec2 = re.search(r"^EC2_USER_DATA='([^']*)'$", files[("CONTEXT", "context.sh")], re.M)
    assert ec2 and base64.b64decode(ec2.group(1)).decode() == data
    assert yaml.safe_load(files[("cidata", "meta-data")])["instance-id"] == "vmbatch-42"
    # sshd: no password or keyboard-interactive logins, whichever volume cloud-init reads.
    [cloud] = [p for p in _parts(data) if p.get_content_type() == "text/cloud-config"]
    cloud_config = yaml.safe_load(cloud.get_payload())
    assert cloud_config["ssh_pwauth"] is False
    assert cloud_config["bootcmd"][0] == sshd.prepend_command()
