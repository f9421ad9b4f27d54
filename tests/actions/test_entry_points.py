"""User actions through the ``crmflow.actions`` entry-point group, as an installed
package declares them: a plugin replaces the built-in ``qualify_lead`` (the AI
qualifier case) and adds an action; a broken entry point is skipped, not fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PLUGIN = """
from typing import Any

from engine.actions.base import Action, Params


class AIQualifier(Action):
    name = "qualify_lead"
    Params = Params

    async def run(self, ctx: Any, params: Any) -> dict[str, Any]:
        return {"model": "test-ai"}


class Shout(Action):
    name = "shout"
    Params = Params

    async def run(self, ctx: Any, params: Any) -> dict[str, Any]:
        return {"shouted": True}


SHOUT = Shout()
"""

ENTRY_POINTS = """[crmflow.actions]
qualify_lead = crmflow_ai_plugin:AIQualifier
shout = crmflow_ai_plugin:SHOUT
broken = crmflow_ai_plugin:DoesNotExist
"""

PROBE = """
import json
from engine.actions import registry
r = registry()
print(json.dumps({name: type(a).__module__ + "." + type(a).__name__ for name, a in r.items()}))
"""


def test_entry_point_actions_replace_and_add(tmp_path: Path) -> None:
    (tmp_path / "crmflow_ai_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "crmflow_ai_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: crmflow-ai-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    env.pop("CRMFLOW_PLUGINS", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    actions = json.loads(done.stdout.strip().splitlines()[-1])
    assert actions["qualify_lead"] == "crmflow_ai_plugin.AIQualifier"  # replaced
    assert actions["shout"] == "crmflow_ai_plugin.Shout"  # added
    assert actions["create_task"].startswith("engine.actions.")  # built-ins stay
    assert "broken" not in actions
    assert "could not load action plugin broken" in done.stderr
