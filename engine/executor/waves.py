"""Planning a wave: what each execution of a batch can do now (no SQL here).

Each execution's ready steps (their inputs done) are sorted into the wave's work:
delays to schedule, ``when`` conditions and business-hours windows to check (``when``
first: a false one skips the step at once; a deferred step's ``when`` is read again at
the opening, in a later batch), database steps grouped per (workflow version, step),
external steps; an execution with nothing ready is completed, or waits for its
earliest scheduled step; anything else goes to the careful path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from engine.actions import registry
from engine.catalog import EntitySchema
from engine.executor.context import now
from engine.executor.plans import Plan
from engine.executor.runner import RUNNABLE_STEP, ready_moment
from engine.model import DelayUntil
from engine.statuses import DONE_STEP, StepStatus


@dataclass
class Item:
    """One claimed execution as the batch advances it."""

    ex: dict[str, Any]
    plan: Plan
    entity: EntitySchema | None
    steps: dict[str, dict[str, Any]]
    row: dict[str, Any] | None = None
    progressed: bool = False
    # steps whose "when" held: they run in the next wave
    when_held: set[str] = field(default_factory=set)
    # windowed steps found open this batch (engine/windows.py): they run in the next wave
    window_open: set[str] = field(default_factory=set)

    @property
    def id(self) -> int:
        return int(self.ex["id"])

    def view(self) -> dict[str, dict[str, Any]]:
        """Earlier steps as templates and ``when`` see them."""
        return {
            s: {"status": r["status"], "result": r.get("result")} for s, r in self.steps.items()
        }


@dataclass
class Wave:
    delays: list[tuple[Item, str, datetime]] = field(default_factory=list)
    database: dict[tuple[int, str], list[Item]] = field(default_factory=dict)
    conditions: dict[tuple[int, str], list[Item]] = field(default_factory=dict)
    # windowed steps due now, per (version, step): open, or deferred to the next opening
    windows: dict[tuple[int, str], list[Item]] = field(default_factory=dict)
    external: list[tuple[Item, str]] = field(default_factory=list)
    completed: list[Item] = field(default_factory=list)
    waiting: dict[int, datetime] = field(default_factory=dict)
    careful: list[Item] = field(default_factory=list)


def plan_wave(items: list[Item]) -> Wave:
    """The wave of work the executions' ready steps make."""
    wave = Wave()
    actions = registry()
    moment = now()
    for item in items:
        plan, rows = item.plan, item.steps
        if any(rows[s]["status"] == StepStatus.FAILED for s in plan.ids):
            wave.careful.append(item)  # on_failure: the runner decides
            continue
        ready = [
            s
            for s in plan.ids
            if rows[s]["status"] in RUNNABLE_STEP
            and all(rows[d]["status"] in DONE_STEP for d in plan.deps[s])
        ]
        if not ready:
            if all(rows[s]["status"] in DONE_STEP for s in plan.ids):
                wave.completed.append(item)
            else:
                wave.careful.append(item)
            continue
        runnable = False
        later: list[datetime] = []
        for sid in ready:
            step, row = plan.steps[sid], rows[sid]
            if row["status"] == "pending" and step.delay is not None:
                if isinstance(step.delay, DelayUntil):
                    break
                at = ready_moment(item.ex, plan, sid, rows) + timedelta(
                    seconds=float(step.delay or 0)
                )
                wave.delays.append((item, sid, at))
                row["status"], row["scheduled_at"] = "scheduled", at
            if (
                row["status"] == "scheduled"
                and row["scheduled_at"]
                and row["scheduled_at"] > moment
            ):
                later.append(row["scheduled_at"])
                continue
            action = actions.get(step.type)
            if action is None:
                break
            if sid in plan.when_sql and sid not in item.when_held:
                key = (int(item.ex["workflow_version_id"]), sid)
                wave.conditions.setdefault(key, []).append(item)
                runnable = True
                continue
            if step.window is not None and sid not in item.window_open:
                key = (int(item.ex["workflow_version_id"]), sid)
                wave.windows.setdefault(key, []).append(item)
                runnable = True
                continue
            if action.kind == "database":
                wave.database.setdefault((int(item.ex["workflow_version_id"]), sid), []).append(
                    item
                )
            else:
                wave.external.append((item, sid))
            runnable = True
        else:
            if not runnable:
                wave.waiting[item.id] = min(later)
            continue
        # a step this loop does not take on (delay.until, when, unknown action)
        wave.careful.append(item)
        drop(wave, item)
    return wave


def drop(wave: Wave, item: Item) -> None:
    for key in list(wave.database):
        wave.database[key] = [i for i in wave.database[key] if i is not item]
        if not wave.database[key]:
            del wave.database[key]
    wave.external = [(i, s) for i, s in wave.external if i is not item]
    for key in list(wave.conditions):
        wave.conditions[key] = [i for i in wave.conditions[key] if i is not item]
        if not wave.conditions[key]:
            del wave.conditions[key]
    wave.delays = [(i, s, a) for i, s, a in wave.delays if i is not item]
    for key in list(wave.windows):
        wave.windows[key] = [i for i in wave.windows[key] if i is not item]
        if not wave.windows[key]:
            del wave.windows[key]
