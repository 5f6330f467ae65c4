"""`vmbatch images`: the images offered to users, from the configuration alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmbatch import cli, config
from vmbatch.images import offer

CATALOG = """
[batch]
default_image = "alma9"
user_images = ["cernvm4"]
[images.alma9]
source = "/srv/images/alma9.qcow2"
description = "AlmaLinux 9 <with> ROOT | 6 & more"
[images.cernvm4]
source = "/srv/images/cernvm4.qcow2"
kernel = "/srv/images/vmlinuz"
context = "cernvm"
[images.debug]
source = "/srv/images/debug.qcow2"
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "vmbatch.toml"
    path.write_text(CATALOG)
    return path


def _run(conf: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.cli, ["-c", str(conf), "images", *args])
    return result.exit_code, result.stdout, result.stderr


def test_default_first_then_choices_and_never_images_jobs_may_not_choose(conf: Path) -> None:
    code, out, _ = _run(conf)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "HOW", "TO", "USE", "DESCRIPTION"]
    assert lines[1].startswith("alma9 ") and "default (no #VMBATCH line)" in lines[1]
    assert "AlmaLinux 9 <with> ROOT | 6 & more" in lines[1]
    assert lines[2].startswith("cernvm4 ") and "#VMBATCH image=cernvm4" in lines[2]
    assert len(lines) == 3 and "debug" not in out


def test_all_adds_the_images_only_vmbatch_run_can_use(conf: Path) -> None:
    code, out, _ = _run(conf, "--all")
    assert code == 0
    assert out.splitlines()[-1].split()[:4] == ["debug", "vmbatch", "run", "--image"]


def test_json_is_a_list_of_stable_objects(conf: Path) -> None:
    code, out, _ = _run(conf, "--format", "json", "--all")
    assert code == 0
    data = json.loads(out)
    assert [d["name"] for d in data] == ["alma9", "cernvm4", "debug"]
    assert data[0] == {
        "name": "alma9",
        "default": True,
        "batch": True,
        "description": "AlmaLinux 9 <with> ROOT | 6 & more",
        "boot": "disk",
        "context": "nocloud",
    }
    assert data[1]["boot"] == "kernel" and data[1]["context"] == "cernvm"
    assert data[2]["batch"] is False


def test_markdown_and_html_escape_what_the_admin_wrote(conf: Path) -> None:
    _, md, _ = _run(conf, "--format", "markdown")
    assert md.splitlines()[0] == "| IMAGE | HOW TO USE | DESCRIPTION |"
    assert "AlmaLinux 9 &lt;with&gt; ROOT \\| 6 &amp; more" in md
    _, page, _ = _run(conf, "--format", "html")
    assert page.startswith('<table class="vmbatch-images">')
    assert "<td>AlmaLinux 9 &lt;with&gt; ROOT | 6 &amp; more</td>" in page
    assert page.count("<tr>") == 3  # header, alma9, cernvm4


def test_unknown_format_is_a_usage_error(conf: Path) -> None:
    code, _, err = _run(conf, "--format", "yaml")
    assert code == 2 and "'yaml' is not one of" in err


def test_nothing_offered_says_why(tmp_path: Path) -> None:
    path = tmp_path / "vmbatch.toml"
    path.write_text('[images.x]\nsource = "/x.qcow2"\n')
    code, out, err = _run(path)
    assert code == 0 and out == ""
    assert "no images are offered to batch jobs here" in err


def test_a_broken_configuration_exits_69_like_every_config_error(tmp_path: Path) -> None:
    path = tmp_path / "vmbatch.toml"
    path.write_text('[batch]\ndefault_image = "nosuch"\n')
    assert cli.main(["-c", str(path), "images"]) == 69


def test_description_must_be_one_printable_line(tmp_path: Path) -> None:
    path = tmp_path / "vmbatch.toml"
    path.write_text('[images.x]\nsource = "/x.qcow2"\ndescription = "two\\nlines"\n')
    with pytest.raises(config.ConfigError, match=r"\[images.x\].description: must be one line"):
        config.load(path)


def test_render_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        offer.render([], "yaml")
