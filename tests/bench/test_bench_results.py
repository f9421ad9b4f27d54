"""The bench's verdicts: a target passes only when its secondary conditions do too."""

from __future__ import annotations

import io

from rich.console import Console

from bench.cli import render
from bench.targets import Result


def test_secondary_conditions_decide_the_verdict() -> None:
    p3 = Result("P3", "latency", 4.0, 5.0, "ms", False, {"p99_ms": 30.0, "p99_pass": False})
    p6 = Result("P6", "rss", 70.0, 200.0, "MB", False, {"lost": 3, "lost_pass": False})
    p4 = Result("P4", "rate", 2500.0, 2000.0, "events/s", True, {"events": 10})
    assert not p3.passed and not p6.passed and p4.passed
    assert p3.as_json()["pass"] is False and p4.as_json()["pass"] is True
    assert not Result("P4", "rate", 1999.0, 2000.0, "events/s", True).passed
    out = io.StringIO()
    render([p3, p6, p4], 1.0, Console(file=out, width=200))
    text = out.getvalue()
    assert "miss (p99)" in text and "miss (events lost)" in text and "pass" in text
