"""Fault injection for crash-consistency tests and soaks: SIGKILL at a named step.

Every step boundary of the prologue, the job starter and the epilogue (and a few points
inside long operations: a download, disk creation, an injection) calls
``faults.point(cfg, "NAME")``. Normally that does nothing. When root's configuration arms
the name (``[debug].fault_points``), the process logs one line and sends itself SIGKILL
(``[debug].fault_action = "kill"``): exactly what Slurm's PrologEpilogTimeout, Torque's
prologalarm or the OOM killer do, with no chance to clean up. The tests then check that the
epilogue or ``vmbatch cleanup`` finishes whatever the dead hook left (docs/design.md,
"Crash consistency").

Only root can arm a point: :func:`vmbatch.config.load` refuses ``[debug].fault_points`` in a
file that is not root's alone (:mod:`vmbatch.trust`), whoever loads it, and the job's
environment never selects root's configuration. Names are stable and dotted
(``<where>.<step done>``); :func:`registry` finds every one in the source, so the
configuration refuses a name that is not a point and the system tests can enumerate them
(a new point without a test fails there).
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import functools
import logging
import os
import re
import signal
import sys
import types
from collections.abc import Mapping
from pathlib import Path

from vmbatch.config import Config, DebugConfig

log = logging.getLogger(__name__)

#: What a point name looks like: lower-case dotted words, at least two.
NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
_PACKAGE = Path(__file__).resolve().parent


def point(setting: Config | DebugConfig | None, name: str) -> None:
    """SIGKILL this process if ``name`` is armed in ``setting``; otherwise do nothing.

    ``name`` must be a string literal at the call (:func:`registry` reads it from the
    source).
    """
    debug = setting.debug if isinstance(setting, Config) else setting
    if debug is None or name not in debug.fault_points:
        return
    log.warning("fault injection: SIGKILL at %s (pid %d)", name, os.getpid())
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):  # a closed stream must not save the process
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@functools.cache
def registry() -> Mapping[str, str]:
    """Every fault point in the package: name -> ``path:line`` of its one call, in source
    order (see :func:`scan`)."""
    return types.MappingProxyType(scan(_PACKAGE))


def scan(package: Path) -> dict[str, str]:
    """The ``faults.point`` calls in the ``*.py`` files under ``package``.

    Raises ValueError for a call whose name is not a literal that :data:`NAME` matches, or
    a name used at two places (a test could not tell which one it reached).
    """
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_point(n.func)]
        for node in sorted(calls, key=lambda n: n.lineno):
            where = f"{path.relative_to(package.parent)}:{node.lineno}"
            arg = node.args[1] if len(node.args) == 2 else None
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                raise ValueError(f"{where}: faults.point needs the name as a string literal")
            if not NAME.fullmatch(arg.value):
                raise ValueError(f"{where}: {arg.value!r} is not a dotted lower-case name")
            if arg.value in found:
                raise ValueError(f"{where}: {arg.value!r} is also at {found[arg.value]}")
            found[arg.value] = where
    return found


def _is_point(func: ast.expr) -> bool:
    """``faults.point``, the one spelling the package uses for a call."""
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "point"
        and isinstance(func.value, ast.Name)
        and func.value.id == "faults"
    )


def problems(names: tuple[str, ...]) -> list[str]:
    """What is wrong with ``[debug].fault_points`` (names that are not points)."""
    known = registry()
    found = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see docs/admin-guide.md"
            found.append(f"[debug].fault_points: {name!r} is not a fault point ({hint})")
    return found
