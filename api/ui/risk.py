"""The risk page's charts, laid out server-side as SVG coordinates (risk.html draws them):
the number of entities per level over the last days, and one sparkline per entity of its
last scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from api.ui.chart import nice_step

WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 48, 96, 12, 28  # room for the axis and the level names
SPARK_W, SPARK_H = 120, 28


@dataclass
class LevelLine:
    level: str
    points: list[tuple[float, float]] = field(default_factory=list)
    last: int = 0

    @property
    def polyline(self) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in self.points)


@dataclass
class TrendChart:
    lines: list[LevelLine]
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str, str]]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom_y: float = HEIGHT - BOTTOM
    right_x: float = WIDTH - RIGHT


def trend_chart(
    rows: list[dict[str, Any]], levels: list[str], days: int, today: date
) -> TrendChart:
    """``rows``: (day, level, n) for the last ``days`` days; one line per level."""
    first = today - timedelta(days=days - 1)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    counts: dict[str, dict[date, int]] = {lv: {} for lv in levels}
    for r in rows:
        day = r["day"].date() if hasattr(r["day"], "date") else r["day"]
        counts.setdefault(r["level"], {})[day] = int(r["n"])
    top_value = max((n for per in counts.values() for n in per.values()), default=0)
    step = nice_step(top_value) if top_value > 0 else 1
    top = step * max(-(-top_value // step), 1)

    def x_of(d: date) -> float:
        return LEFT + plot_w * (d - first).days / max(days - 1, 1)

    def y_of(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    lines = []
    for level in counts:
        per = counts[level]
        points = [
            (x_of(first + timedelta(days=i)), y_of(per.get(first + timedelta(days=i), 0)))
            for i in range(days)
        ]
        lines.append(LevelLine(level, points, per.get(today, 0)))
    x_ticks = [
        (x_of(today - timedelta(days=d)), f"{today - timedelta(days=d):%b %d}",
         "end" if d == 0 else "middle")
        for d in range(0, days, max(days // 4, 1))
    ]  # fmt: skip
    y_ticks = [(y_of(step * i), f"{step * i:g}") for i in range(round(top / step) + 1)]
    return TrendChart(lines, y_ticks, x_ticks)


def sparkline(scores: list[float]) -> str:
    """An entity's last scores as polyline points in a SPARK_W by SPARK_H box (0 to 1 for
    probabilities, else scaled to the scores' own range)."""
    if not scores:
        return ""
    lo, hi = min(scores), max(scores)
    if lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    span = (hi - lo) or 1.0
    n = len(scores)
    return " ".join(
        f"{2 + (SPARK_W - 4) * (i / (n - 1) if n > 1 else 1):.1f},"
        f"{2 + (SPARK_H - 4) * (1 - (s - lo) / span):.1f}"
        for i, s in enumerate(scores)
    )
