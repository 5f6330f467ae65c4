from __future__ import annotations

import io
import stat
from pathlib import Path

import paramiko
import pycdlib
import yaml

from vmbatch.contextualize import REGISTRY, ContextSpec, get_method
from vmbatch.contextualize.keys import generate
from vmbatch.contextualize.nocloud import build_iso, meta_data, user_data
from vmbatch.state import JobDir


def _spec(hostname: str = "vmbatch-42") -> ContextSpec:
    return ContextSpec(
        instance_id="vmbatch-42",
        hostname=hostname,
        login_user="root",
        authorized_keys=(generate("client").public_openssh,),
        host_key=generate("host"),
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
    assert data["disable_root"] is False  # vmbatch logs in as root in this version
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


def test_every_registered_method_prepares_a_seed(tmp_path: Path) -> None:
    assert REGISTRY
    for name in REGISTRY:
        method = get_method(name)
        assert method.name == name
        jobdir = JobDir(tmp_path, f"job-{name}").create()
        disks = method.prepare(_spec(), jobdir)
        assert disks and all(d.path.parent == jobdir.path for d in disks)
        for d in disks:
            assert d.readonly
            assert stat.S_IMODE(d.path.stat().st_mode) == 0o600
