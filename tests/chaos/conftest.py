"""Fixtures of the chaos suite (each module sets ``pytestmark = pytest.mark.chaos``, so
the default run, ``-m 'not chaos'``, skips them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.helpers import Process, processes


@pytest.fixture
def procs() -> Iterator[list[Process]]:
    """Subprocesses started by the test, stopped at its end."""
    with processes() as started:
        yield started


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path
