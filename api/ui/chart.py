"""The latency chart, laid out server-side as SVG coordinates (the template draws them).

One chart per workflow: p50 and p95 of event → first action latency per UTC day, over a
fixed window of days ending today, so charts of different workflows line up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

WIDTH, HEIGHT = 560, 180
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 12, 28  # room for the axis labels


@dataclass
class Series:
    name: str  # "p50" or "p95": also the CSS class of its line
    points: list[tuple[float, float]] = field(default_factory=list)

    @property
    def polyline(self) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in self.points)


@dataclass
class Chart:
    workflow_id: int
    workflow_name: str
    executions: int
    series: list[Series]
    y_ticks: list[tuple[float, str]]  # (y, label)
    x_ticks: list[tuple[float, str, str]]  # (x, label, text-anchor)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom_y: float = HEIGHT - BOTTOM
    right_x: float = WIDTH - RIGHT


def nice_step(top: float, ticks: int = 4) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) covering ``top`` in ``ticks``."""
    raw = top / ticks
    magnitude: float = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def format_seconds(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:g} s"


def build_charts(rows: list[dict[str, Any]], days: int, today: date) -> list[Chart]:
    """``rows``: crmflow.execution_report rows (workflow_id, workflow_name, day,
    executions, p50_first_action_s, p95_first_action_s), one chart per workflow."""
    first_day = today - timedelta(days=days - 1)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    by_workflow: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_workflow.setdefault(row["workflow_id"], []).append(row)

    def x_of(day: date) -> float:
        return LEFT + plot_w * (day - first_day).days / max(days - 1, 1)

    # Counted back from today, so the newest day is always labelled.
    x_ticks = [
        (
            x_of(today - timedelta(days=d)),
            f"{today - timedelta(days=d):%b %d}",
            "end" if d == 0 else "middle",  # today's label ends at the right edge
        )
        for d in range(0, days, max(days // 5, 1))
    ]
    charts = []
    for workflow_id, wf_rows in by_workflow.items():
        values = [
            float(r[k])
            for r in wf_rows
            for k in ("p50_first_action_s", "p95_first_action_s")
            if r[k] is not None
        ]
        step = nice_step(max(values)) if values and max(values) > 0 else 0.25
        top = step * max(math.ceil(max(values, default=0) / step), 1)

        def y_of(value: float, top: float = top) -> float:
            return TOP + plot_h * (1 - value / top)

        series = []
        for name, key in (("p50", "p50_first_action_s"), ("p95", "p95_first_action_s")):
            points = [(x_of(r["day"]), y_of(float(r[key]))) for r in wf_rows if r[key] is not None]
            series.append(Series(name, points))
        y_ticks = [(y_of(step * i), format_seconds(step * i)) for i in range(round(top / step) + 1)]
        charts.append(
            Chart(
                workflow_id=workflow_id,
                workflow_name=wf_rows[0]["workflow_name"],
                executions=sum(int(r["executions"]) for r in wf_rows),
                series=series,
                y_ticks=y_ticks,
                x_ticks=x_ticks,
            )
        )
    return charts
