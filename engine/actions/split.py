"""split: an A/B (or A/B/C...) branch, the same path for an entity every time.

::

    {"id": "ab", "type": "split", "paths": {"A": 50, "B": 50}}

The step's result is ``{"path": "A"}``; later steps branch on it with ``when``
(``{"field": "steps.ab.result.path", "operator": "equals", "value": "A"}``).

The path is a deterministic bucket of (workflow id, entity): the workflow's id, not its
version, so editing the workflow keeps each entity on its path, and an entity that
enrolls again takes the same one. Weights are proportional (``{"A": 1, "B": 1}`` is
``{"A": 50, "B": 50}``); the entity's point (the first 32 bits of the MD5 of its key,
:func:`split_key`) modulo the total weight falls into the paths' ranges, taken in the
order of their names. Changing weights moves only the entities at the ranges' edges.
Without an entity (a manual or event run about nothing), the execution's id is the key.

The same function is in SQL (``crmflow.split_path(key, names, weights)``,
sql/install/views.sql), for reports and for checking the distribution over many keys.

A pure database step with no effect but its record: it runs inline in the matcher's
transaction and in the executor's waves.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import Field, field_validator

from engine.actions.base import Action, Params
from engine.executor.context import StepContext

_PATH_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_PATHS = 20
MAX_WEIGHT = 10_000


class SplitParams(Params):
    paths: dict[str, Any] = Field(min_length=2, max_length=MAX_PATHS)

    @field_validator("paths", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError(
                'paths is an object of path names and weights, like {"A": 50, "B": 50}'
            )
        if len(v) < 2:
            raise ValueError("a split needs at least two paths")
        for name, weight in v.items():
            if not isinstance(name, str) or not _PATH_RE.fullmatch(name):
                raise ValueError(f"path name {name!r}: letters, digits, '_' and '-', 1-64 of them")
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise ValueError(f"path {name!r}: a weight is a whole number, not {weight!r}")
            if not 1 <= weight <= MAX_WEIGHT:
                raise ValueError(f"path {name!r}: a weight is from 1 to {MAX_WEIGHT}, not {weight}")
        return v


def entity_key(entity_type: str | None, pk: Any, execution_id: int) -> str:
    """The entity part of the key: ``lead:42`` (one key column), the key as compact
    sorted JSON for composite keys, ``execution:<id>`` without an entity."""
    if pk is None:
        return f"execution:{execution_id}"
    if isinstance(pk, dict) and len(pk) == 1:
        return f"{entity_type}:{next(iter(pk.values()))}"
    return f"{entity_type}:{json.dumps(pk, sort_keys=True, separators=(',', ':'))}"


def split_key(workflow_id: int, entity_type: str | None, pk: Any, execution_id: int) -> str:
    return f"{workflow_id}:{entity_key(entity_type, pk, execution_id)}"


def split_point(key: str) -> int:
    """0 .. 2^32-1: the first 8 hex digits of the key's MD5 (as crmflow.split_point)."""
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16)


def choose(paths: dict[str, int], key: str) -> str:
    names = sorted(paths)
    slot = split_point(key) % sum(paths.values())
    for name in names:
        slot -= paths[name]
        if slot < 0:
            return name
    raise AssertionError("unreachable: the slot is below the total")


def split_paths(steps: list[Any], ids: list[str]) -> dict[str, set[str]]:
    """The path names of each split step of a workflow, by step id."""
    return {
        sid: set(step.params["paths"])
        for sid, step in zip(ids, steps, strict=True)
        if step.type == "split" and isinstance(step.params.get("paths"), dict)
    }


def when_issues(leaf: Any, splits: dict[str, set[str]]) -> list[tuple[str, str]]:
    """A ``when`` comparing a split's ``result.path`` with a name it does not have (a
    typo would skip the step for everyone): (path, message) pairs."""
    parts = str(leaf.field).split(".")
    if len(parts) != 4 or parts[0] != "steps" or parts[2:] != ["result", "path"]:
        return []
    names = splits.get(parts[1])
    if names is None:
        return []
    if leaf.operator in ("equals", "not_equals"):
        values = [leaf.value]
    elif leaf.operator in ("in", "not_in") and isinstance(leaf.value, list):
        values = leaf.value
    else:
        return []
    unknown = [v for v in values if v not in names]
    if not unknown:
        return []
    return [
        (
            leaf.value_path or f"{leaf.path}.value",
            f"split {parts[1]!r} has no path {unknown[0]!r}; its paths: {sorted(names)}",
        )
    ]


class Split(Action):
    name = "split"
    Params = SplitParams
    inline = True
    description = (
        "Send each entity down one of several weighted paths, the same one every time "
        "(result {'path': NAME}); later steps branch on it with 'when'."
    )

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        ex = ctx.execution
        key = split_key(
            int(ex["workflow_id"]), ex.get("entity_type"), ctx.entity_pk, ctx.execution_id
        )
        return {"path": choose(params.paths, key)}


ACTION = Split()
