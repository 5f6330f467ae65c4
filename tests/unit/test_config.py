from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from vmbatch import config
from vmbatch.errors import ConfigError, Disposition

CONF = Path(__file__).resolve().parents[2] / "conf" / "vmbatch.toml"


def test_shipped_config_is_valid_and_equals_the_defaults() -> None:
    cfg = config.load(CONF)
    assert cfg.libvirt == config.LibvirtConfig()
    assert cfg.vm == config.VmConfig()
    assert cfg.paths == config.PathsConfig()
    assert cfg.tools == config.ToolsConfig()
    assert cfg.ssh == config.SshConfig()
    assert cfg.batch == config.BatchConfig()


def test_shipped_config_documents_every_key() -> None:
    text = CONF.read_text()
    for section, cls in config._SECTIONS.items():
        assert f"[{section}]" in text
        for f in dataclasses.fields(cls):
            assert re.search(rf"^#? ?{f.name} *=", text, re.M), f"[{section}].{f.name}"
    for f in dataclasses.fields(config.ImageConfig):
        if f.name != "name":
            assert re.search(rf"^# {f.name} +=", text, re.M), f"[images.NAME].{f.name}"
    for f in dataclasses.fields(config.MountConfig):
        if f.name != "name":
            assert re.search(rf"^# {f.name} +=", text, re.M), f"[mounts.NAME].{f.name}"


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(
            {
                "vm": {"memory": "lots", "accel": "xen", "bootimeout": 3},
                "libvirt": {"timeout": -1},
                "paths": {"job_dir": "relative/dir"},
                "imgs": {},
                "images": {
                    "bad name!": {"source": "/x"},
                    "d": {"source": "rel.qcow2", "initrd": "/i"},
                },
            }
        )
    problems = info.value.problems
    text = "\n".join(problems)
    assert "[vm].memory: expected an integer, got 'lots'" in text
    assert "[vm].accel: expected one of 'auto', 'kvm', 'tcg', got 'xen'" in text
    assert "unknown key 'bootimeout' (did you mean 'boot_timeout'?)" in text
    assert "[libvirt].timeout: must be > 0" in text
    assert "[paths].job_dir: must be an absolute path" in text
    assert "unknown section 'imgs' (did you mean 'images'?)" in text
    assert "[images.bad name!]: invalid image name" in text
    assert "[images.d].source: must be an absolute path, file:///path or http(s)" in text
    assert "[images.d]: initrd given without kernel" in text
    assert info.value.disposition is Disposition.OFFLINE_NODE


def test_wrong_types_are_named() -> None:
    with pytest.raises(ConfigError, match=r"\[ssh\]\.port: expected an integer, got True"):
        config.parse({"ssh": {"port": True}})
    with pytest.raises(ConfigError, match=r"\[vm\] must be a table"):
        config.parse({"vm": 3})


def test_precancel_timeout_is_checked() -> None:
    assert config.parse({"batch": {"precancel_timeout": 0}}).batch.precancel_timeout == 0.0
    with pytest.raises(ConfigError, match=r"\[batch\]\.precancel_timeout: must be >= 0"):
        config.parse({"batch": {"precancel_timeout": -1}})


def test_image_requires_source() -> None:
    with pytest.raises(ConfigError, match=r"\[images.x\]: missing required key 'source'"):
        config.parse({"images": {"x": {"format": "qcow2"}}})


def test_dropins_override_in_lexical_order(tmp_path: Path) -> None:
    main = tmp_path / "site.toml"
    main.write_text('[vm]\nmemory = 512\nvcpus = 2\n[images.a]\nsource = "/a.qcow2"\n')
    dropins = tmp_path / "site.d"
    dropins.mkdir()
    (dropins / "20-b.toml").write_text("[vm]\nmemory = 2048\n")
    (dropins / "10-a.toml").write_text("[vm]\nmemory = 1024\n[images.a]\nmemory = 300\n")
    (dropins / "ignored.txt").write_text("not toml")
    cfg = config.load(main)
    assert cfg.vm.memory == 2048 and cfg.vm.vcpus == 2
    assert cfg.images["a"].memory == 300 and cfg.images["a"].source == "/a.qcow2"
    assert cfg.files == (main, dropins / "10-a.toml", dropins / "20-b.toml")


def test_env_var_selects_file_and_missing_explicit_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(config.ENV_VAR, str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found"):
        config.load()


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text("[vm\n")
    with pytest.raises(ConfigError, match=r"x\.toml: not valid TOML"):
        config.load(f)


def test_config_is_frozen() -> None:
    cfg = config.parse({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vm.memory = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.images["x"] = None  # type: ignore[index]


def test_remote_sources_need_a_checksum_unless_explicitly_unverified() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(
            {
                "images": {
                    "a": {"source": "https://example.invalid/a.qcow2"},
                    "b": {"source": "file://relative/b.qcow2", "sha256": "ab"},
                    "c": {"source": "ftp://x/c", "sha256": "0" * 64, "sha512": "0" * 128},
                }
            }
        )
    text = "\n".join(info.value.problems)
    assert "[images.a]: a downloaded image needs sha256, sha512 or checksum_url" in text
    assert "[images.b].source: file:// URLs need an absolute path" in text
    assert "[images.b].sha256: must be 64 hex digits" in text
    assert "[images.c].source: must be an absolute path, file:///path or http(s)" in text
    assert (
        "[images.c]: give only one of sha256, sha512, checksum_url (not sha256 and sha512)" in text
    )
    cfg = config.parse(
        {
            "images": {"u": {"source": "http://127.0.0.1/u.img", "verify": False}},
            "cache": {"image_dirs": ["/srv/images", "/mnt/nfs/images"]},
        }
    )
    assert cfg.cache.image_dirs == (Path("/srv/images"), Path("/mnt/nfs/images"))
    with pytest.raises(ConfigError, match=r"\[cache\]\.image_dirs: expected a list of"):
        config.parse({"cache": {"image_dirs": "/srv"}})
    with pytest.raises(ConfigError, match=r"\[cache\]\.image_dirs: must be an absolute path"):
        config.parse({"cache": {"image_dirs": ["srv"]}})


def test_a_checksum_file_url_stands_for_the_checksum() -> None:
    base = "https://cloud.example.invalid/12/latest/"
    cfg = config.parse(
        {
            "images": {
                "debian": {
                    "source": base + "debian-12-genericcloud-amd64.qcow2",
                    "checksum_url": base + "SHA512SUMS",
                    "refresh_interval": 86400,  # follows "latest": the checksum file changes
                },
                "local": {
                    "source": "file:///var/lib/vmbatch/images/x.qcow2",
                    "checksum_url": "file:///var/lib/vmbatch/images/SHA256SUMS",
                },
            }
        }
    )
    assert cfg.images["debian"].checksum_url == base + "SHA512SUMS"
    assert cfg.images["debian"].kernel is None  # boots from its own disk
    with pytest.raises(ConfigError) as info:
        config.parse(
            {
                "images": {
                    "both": {
                        "source": base + "a.qcow2",
                        "sha256": "0" * 64,
                        "checksum_url": base + "SHA256SUMS",
                    },
                    "scheme": {"source": base + "b.qcow2", "checksum_url": "ftp://x/SUMS"},
                    "inplace": {"source": "/srv/c.qcow2", "checksum_url": base + "SUMS"},
                    "unverified": {
                        "source": base + "d.qcow2",
                        "checksum_url": base + "SUMS",
                        "verify": False,
                    },
                    "dir": {"source": base, "checksum_url": base + "SUMS"},
                }
            }
        )
    text = "\n".join(info.value.problems)
    assert "[images.both]: give only one of sha256, sha512, checksum_url" in text
    assert "[images.scheme].checksum_url: must be an http(s):// or file:/// URL" in text
    assert "[images.inplace].checksum_url: the source is an absolute path, used in place" in text
    assert "[images.unverified]: checksum_url with verify = false" in text
    assert "[images.dir].source: names no file to look up in the checksum file" in text


def test_extra_disks_and_refresh_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(
            {
                "disks": {"reserve_gib": -1, "scratch_gib": -2},
                "images": {
                    "pinned": {
                        "source": "https://example.invalid/a.img",
                        "sha256": "0" * 64,
                        "refresh_interval": 3600,
                    },
                    "local": {"source": "/srv/a.img", "refresh_interval": 60},
                    "neg": {"source": "/srv/b.img", "cvmfs_cache_gib": -1},
                },
            }
        )
    text = "\n".join(info.value.problems)
    assert "[disks].reserve_gib: must be >= 0" in text
    assert "[disks].scratch_gib: must be >= 0 (0: no disk)" in text
    assert "[images.pinned].refresh_interval: only http(s) images without a fixed" in text
    assert "[images.local].refresh_interval: only http(s) images without a fixed" in text
    assert "[images.neg].cvmfs_cache_gib: must be >= 0" in text
    cfg = config.parse(
        {
            "disks": {"cvmfs_cache_gib": 20},
            "images": {
                "latest": {
                    "source": "https://example.invalid/l.img",
                    "verify": False,
                    "refresh_interval": 86400,
                    "scratch_gib": 5,
                }
            },
        }
    )
    assert cfg.images["latest"].refresh_interval == 86400.0
    assert (cfg.disks.cvmfs_cache_gib, cfg.images["latest"].scratch_gib) == (20.0, 5.0)


def test_mounts_are_validated() -> None:
    ok = config.parse(
        {
            "mounts": {
                "home": {"source": "nfs://nfs.example.org/export/home", "path": "/home"},
                "data": {
                    "source": "nfs://192.0.2.7:20490/data",
                    "path": "/data/",
                    "options": "vers=4.2,hard,nosuid",
                    "timeout": 30,
                },
            }
        }
    )
    assert ok.mounts["data"].path == Path("/data") and ok.mounts["data"].timeout == 30.0
    assert ok.mounts["home"].attempt_timeout == 30.0
    with pytest.raises(ConfigError) as exc:
        config.parse(
            {
                "vm": {"outbound_network": False},
                "mounts": {
                    "a": {"source": "smb://x/y", "path": "/a"},
                    "b": {"source": "nfs://x:99999/y", "path": "relative"},
                    "c": {"source": "nfs://x/y", "path": "/c", "options": "retry=5"},
                    "d": {"source": "nfs://x/y", "path": "/c/../etc", "options": "a;reboot"},
                    "e": {"source": "nfs://x/y", "path": "/", "timeout": 0},
                    "f": {"source": "nfs://$(id)/y", "path": "/f"},
                    "g": {"source": "nfs://x/y", "path": "/g"},
                    "h": {"source": "nfs://z/y", "path": "/g/"},
                },
            }
        )
    text = str(exc.value)
    for needle in [
        "[mounts] need [vm].outbound_network = true",
        "[mounts.a].source: must be nfs://server[:port]/export",
        "[mounts.b].source: port must be 1-65535",
        "[mounts.b].path: must be an absolute path",
        "[mounts.c].options: vmbatch sets 'retry' itself",
        "[mounts.d].path: must be an absolute path other than /",
        "[mounts.d].options: 'a;reboot' is not a mount option",
        "[mounts.e].timeout: must be > 0 seconds",
        "[mounts.f].source: must be nfs://",
        "[mounts]: more than one mount at /g",
    ]:
        assert needle in text, needle


def test_tool_defaults_are_found_where_the_distribution_puts_them(tmp_path: Path) -> None:
    from vmbatch.config import first_present

    el9 = tmp_path / "libexec" / "qemu-kvm"
    el9.parent.mkdir()
    el9.touch()
    assert first_present(str(tmp_path / "bin" / "qemu-system-x86_64"), str(el9))() == el9
    assert first_present("/nonexistent/a", "/nonexistent/b")() == Path("/nonexistent/a")
