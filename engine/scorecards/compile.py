"""Scorecards compiled to set-based SQL (docs/scorecards.md).

One statement scores every entity asked for (the whole table, or the keys in
``%(keys)s``): the row factors (conditions and whitelisted expressions) read the entity's
row ``n``; the aggregates read one grouped CTE per related table (a single pass over its
rows in the widest window, each factor's window and ``where`` as a FILTER); then the
segment's weights, the contributions, the score, the level, the top factors and the
days to the event. The scoring statement stores the results in ``crmflow.score_latest``
and ``crmflow.score_history``; the entity's columns are written afterwards in short
chunks (:func:`compile_write_chunk`), so no host row stays locked for long.

Every time-dependent part reads ``as_of`` (``%(as_of)s``, NULL meaning ``now()``), so
:func:`compile_features` can compute the factors as of a past date.

This module is the public entry point; the builders live in:

- ``sqlparts``: the shared types (:class:`LoadedScorecard`, :class:`Relation`,
  :class:`Compiled`) and SQL fragments (``as_of``, literals, entity keys, casts);
- ``row_factors``: conditions and expression factors over the entity's row;
- ``aggregates``: the grouped CTEs over the related tables;
- ``features``: :func:`build` (the features CTEs) and :func:`compile_features`;
- ``scoring``: the score, level, top factors, days, and :func:`compile_scoring`;
- ``entity_writes``: :func:`compile_write_chunk`.
"""

from __future__ import annotations

from engine.scorecards.aggregates import NUMERIC_KINDS, TIME_KINDS
from engine.scorecards.entity_writes import compile_write_chunk
from engine.scorecards.features import build, compile_features, segment_name
from engine.scorecards.scoring import (
    EXP_CLAMP,
    RANKED_FACTORS,
    compile_scoring,
    contributions_of,
    scored_ctes,
)
from engine.scorecards.sqlparts import AS_OF, F8, Compiled, LoadedScorecard, Relation, lit

__all__ = [
    "AS_OF",
    "EXP_CLAMP",
    "F8",
    "NUMERIC_KINDS",
    "RANKED_FACTORS",
    "TIME_KINDS",
    "Compiled",
    "LoadedScorecard",
    "Relation",
    "build",
    "compile_features",
    "compile_scoring",
    "compile_write_chunk",
    "contributions_of",
    "lit",
    "scored_ctes",
    "segment_name",
]
