"""The action registry: built-in actions plus plugins from the ``crmflow.actions`` entry points.

Modules named in ``CRMFLOW_PLUGINS`` (JSON list of dotted paths) are imported and
their ``ACTION`` (or list ``ACTIONS``) registered. A plugin package can instead
declare, in its ``pyproject.toml``::

    [project.entry-points."crmflow.actions"]
    score_with_ai = "my_package.actions:AIQualifier"

where ``AIQualifier`` subclasses :class:`engine.actions.base.Action`. A plugin with the
name of a built-in replaces it (an AI ``qualify_lead``, say).
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from importlib.metadata import entry_points

from engine.actions.base import Action, PermanentError, Skip

log = logging.getLogger(__name__)

BUILTIN_MODULES = (
    "create_task",
    "update_field",
    "send_notification",
    "assign_owner",
    "send_email",
    "http_request",
    "qualify_lead",
    "enrich_lead",
    "score_feedback",
    "split",
    "wait",
)

__all__ = ["Action", "PermanentError", "Skip", "registry"]


@cache
def registry() -> dict[str, Action]:
    actions: dict[str, Action] = {}
    for module_name in BUILTIN_MODULES:
        module = importlib.import_module(f"engine.actions.{module_name}")
        action: Action = module.ACTION
        actions[action.name] = action
    from engine.config import get_settings

    for path in get_settings().plugins:
        module = importlib.import_module(path)
        found = getattr(module, "ACTIONS", None) or [module.ACTION]
        for action in found:
            actions[action.name] = action
    for ep in entry_points(group="crmflow.actions"):
        try:
            loaded = ep.load()
            action = loaded() if isinstance(loaded, type) else loaded
            if not isinstance(action, Action):
                raise TypeError(f"{ep.value} is not a crmflow Action")
        except Exception:
            log.exception("could not load action plugin %s", ep.name)
            continue
        actions[action.name] = action
    return actions
