"""wait: a step that does nothing itself. With ``wait_until`` (engine/lifecycle.py) it is a
pure wait whose result says how it ended (``{"outcome": "met" | "event" | "timed_out"}``);
with a ``delay`` it is a pause before the steps that depend on it."""

from __future__ import annotations

from typing import Any

from engine.actions.base import Action
from engine.executor.context import StepContext


class Wait(Action):
    name = "wait"
    description = "Does nothing: a wait_until or a delay of its own"

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        return {}


ACTION = Wait()
