"""Where the tests find the repository's files: the tests live in packages under tests/
(tests/<part>/test_*.py), so a path computed from a test's own ``__file__`` depends on how
deep it sits; these do not."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
