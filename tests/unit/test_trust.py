"""Root reads only what root alone controls: vmbatch.trust and config.load(as_root=True)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmbatch import config
from vmbatch.errors import ConfigError, ImageError
from vmbatch.images.catalog import check_trusted
from vmbatch.trust import qemu_uids, untrusted_reason

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
NOBODY = 65534


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A root-owned 0755 directory (pytest's own tmp dirs are 0700 root, under /tmp)."""
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def test_root_owned_paths_are_trusted_and_tmp_style_sticky_dirs_too(base: Path) -> None:
    f = base / "vmbatch.toml"
    f.write_text("")
    f.chmod(0o644)
    assert untrusted_reason(f) is None
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "root-file").write_text("")
    (sticky / "root-file").chmod(0o600)
    assert untrusted_reason(sticky / "root-file") is None
    assert untrusted_reason(base / "not" / "there" / "yet") is None


def test_a_users_file_or_directory_anywhere_on_the_path_is_refused(base: Path) -> None:
    home = base / "home"
    home.mkdir()
    evil = home / "evil.toml"
    evil.write_text("")
    os.chown(evil, NOBODY, NOBODY)
    assert "owned by uid 65534" in (untrusted_reason(evil) or "")
    os.chown(evil, 0, 0)
    os.chown(home, NOBODY, NOBODY)  # root's file in a user's directory: can be swapped
    assert "owned by uid 65534" in (untrusted_reason(evil) or "")
    assert "owned by uid 65534" in (untrusted_reason(home / "state" / "new") or "")
    os.chown(home, 0, 0)
    home.chmod(0o775)
    assert "writable by its group" in (untrusted_reason(evil) or "")
    home.chmod(0o755)
    evil.chmod(0o666)
    assert "writable by others" in (untrusted_reason(evil) or "")
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert "writable by others" in (untrusted_reason(sticky) or ""), "the dir itself: no"


def test_symlinks_are_followed_and_their_targets_judged(base: Path) -> None:
    user = base / "user"
    user.mkdir()
    os.chown(user, NOBODY, NOBODY)
    (user / "x.toml").write_text("")
    link = base / "link.toml"
    link.symlink_to(user / "x.toml")
    assert "owned by uid 65534" in (untrusted_reason(link) or "")
    dirlink = base / "etc-link"
    dirlink.symlink_to(base)
    (base / "ok.toml").write_text("")
    assert untrusted_reason(dirlink / "ok.toml") is None
    loop = base / "loop"
    loop.symlink_to(loop)
    assert "too many symbolic links" in (untrusted_reason(loop / "x") or "")


def test_as_root_config_refuses_user_files_and_user_directories(base: Path) -> None:
    home = base / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    good = base / "vmbatch.toml"
    good.write_text(f'[batch]\nstate_dir = "{home}/state"\nuser_dir = "{home}/run"\n')
    with pytest.raises(ConfigError) as err:
        config.load(good, as_root=True)
    text = str(err.value)
    assert f"{home} is owned by uid 65534" in text and "chmod go-w" in text
    assert config.load(good).batch.state_dir == home / "state"  # not root: not judged
    evil = home / "evil.toml"
    evil.write_text("")
    with pytest.raises(ConfigError, match="root will not use it"):
        config.load(evil, as_root=True)
    dropins = base / "vmbatch.d"
    dropins.mkdir()
    good.write_text("")
    (dropins / "50-user.toml").write_text("[vm]\nmemory = 64\n")
    os.chown(dropins / "50-user.toml", NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=r"50-user\.toml is owned by uid 65534"):
        config.load(good, as_root=True)


def test_honour_env_false_ignores_vmbatch_config(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = base / "named.toml"
    named.write_text("[vm]\nmemory = 77\n")
    monkeypatch.setenv("VMBATCH_CONFIG", str(named))
    assert config.load(as_root=True).vm.memory == 77
    assert config.config_files(honour_env=False)[0] == config.DEFAULT_PATH


def test_programs_a_user_could_swap_fail_the_config_images_only_their_jobs(base: Path) -> None:
    """A program root runs is the whole node's problem; a badly placed image is its own
    jobs' (ImageError), so one image cannot take the node out of service."""
    home = base / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    cfg = base / "vmbatch.toml"
    cfg.write_text(
        f'[tools]\nqemu_img = "{home}/qemu-img"\n'
        f'[images.x]\nsource = "{home}/x.qcow2"\nkernel = "{base}/vmlinux"\n'
    )
    with pytest.raises(ConfigError) as err:
        config.load(cfg, as_root=True)
    assert str(err.value).count(f"{home} is owned by uid 65534") == 1, "the tool only"
    cfg.write_text(f'[images.x]\nsource = "{home}/x.qcow2"\nkernel = "{base}/vmlinux"\n')
    entry = config.load(cfg, as_root=True).images["x"]
    with pytest.raises(ImageError, match=f"image 'x': {home} is owned by uid 65534"):
        check_trusted(entry)


def test_an_image_libvirt_lent_to_qemu_is_fine_its_directory_is_not(base: Path) -> None:
    """libvirt re-owns a base image to QEMU's user while VMs use it (dynamic_ownership)."""
    qemu = min(qemu_uids()) if qemu_uids() else None
    if qemu is None:
        pytest.skip("no libvirt-qemu/qemu account on this host")
    image = base / "disk.qcow2"
    image.write_bytes(b"")
    os.chown(image, qemu, qemu)
    cfg = base / "vmbatch.toml"
    cfg.write_text(f'[images.x]\nsource = "{image}"\n[tools]\nqemu_img = "{image}"\n')
    with pytest.raises(ConfigError, match=f"is owned by uid {qemu}"):
        config.load(cfg, as_root=True)  # as a program root runs: no
    check_trusted(config.parse({"images": {"x": {"source": str(image)}}}).images["x"])
    imgdir = base / "images"
    imgdir.mkdir()
    os.chown(imgdir, qemu, qemu)
    assert untrusted_reason(imgdir / "disk.qcow2", frozenset({0, qemu})) is not None
