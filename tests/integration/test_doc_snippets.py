"""Issue 16: every TOML snippet the docs show passes `vmbatch config check`, pasted as the
docs say: each snippet's first line names the file it goes to (the main configuration or a
drop-in of ``/etc/vmbatch/vmbatch.d``); one document's snippets are pasted in order, on top
of the configuration scripts/install-node installs (conf/vmbatch.toml)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"])
_SNIPPET = re.compile(r"^( *)```toml\n(.*?)^\1```", re.M | re.S)
_TARGET = re.compile(r"# (/etc/vmbatch/(?:vmbatch\.toml|vmbatch\.d/[\w.-]+\.toml))\b")


def snippets(doc: Path) -> list[tuple[str, str]]:
    """(target file, text) of every ```toml block, in order."""
    found = []
    for m in _SNIPPET.finditer(doc.read_text()):
        indent = len(m.group(1))
        text = "".join(line[indent:] for line in m.group(2).splitlines(keepends=True))
        target = _TARGET.match(text.lstrip().splitlines()[0] if text.strip() else "")
        assert target, f"{doc.name}: a TOML snippet does not say which file it goes in:\n{text}"
        found.append((target.group(1), text))
    return found


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if "```toml" in d.read_text()], ids=lambda d: d.name
)
def test_doc_snippets_pass_config_check(doc: Path, tmp_path: Path) -> None:
    etc = tmp_path / "etc-vmbatch"
    (etc / "vmbatch.d").mkdir(parents=True)
    shutil.copy(ROOT / "conf" / "vmbatch.toml", etc / "vmbatch.toml")
    for target, text in snippets(doc):
        path = etc / target.removeprefix("/etc/vmbatch/")
        if target.endswith("/vmbatch.toml"):
            path.write_text(path.read_text() + "\n" + text)  # appended: "in vmbatch.toml"
        else:
            path.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "vmbatch", "--config", str(etc / "vmbatch.toml"),
         "config", "check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, f"{doc.name}:\n{r.stderr}{r.stdout}"
