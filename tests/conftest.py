"""Options shared by every test layer."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate-golden",
        action="store_true",
        help="rewrite tests/unit/golden/*.xml from the current code instead of comparing",
    )


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Entry points called in-process (``cli.main``, the hooks' ``run_*``) install their log
    handlers on the root logger, on the stderr of the moment (a test's capture, closed
    after it); no later test, in any layer, may inherit them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
