"""Path and query parameters shared by the routers.

Parameters are parsed strictly: a number is ASCII digits (pydantic alone would also take
" 2" or "\u00a02"), a flag is true or false, and ids fit a PostgreSQL bigint (larger
ones are a 422, not a database error).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BeforeValidator, Field, WithJsonSchema

from api.schemas import MAX_BIGINT

_DIGITS = re.compile(r"[0-9]{1,20}")


def _digits(value: Any) -> Any:
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("expected a whole number written in digits")
    return value


def _flag(value: Any) -> Any:
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ValueError("expected true or false")
        return value.lower() == "true"
    return value


def _schema(minimum: int, maximum: int) -> WithJsonSchema:
    # The JSON schema is spelled out: with a validator before it, pydantic would
    # document the bounds as "ge"/"le" instead of minimum/maximum.
    return WithJsonSchema({"type": "integer", "minimum": minimum, "maximum": maximum})


Id = Annotated[int, BeforeValidator(_digits), Field(ge=1, le=MAX_BIGINT), _schema(1, MAX_BIGINT)]
Flag = Annotated[bool, BeforeValidator(_flag)]

ObjectId = Annotated[Id, Path(description="the object's id")]
Limit = Annotated[
    int,
    BeforeValidator(_digits),
    Field(ge=1, le=500),
    _schema(1, 500),
    Query(description="at most this many items"),
]
