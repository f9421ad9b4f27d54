"""API keys of the management API: ``crmflow apikey create/list/revoke`` and ``/apikeys``.

A key reads ``cf_<prefix>_<secret>``. The prefix (12 hex digits) is stored as is and
finds the key; the secret is stored only as its SHA-256 and compared in constant time.
The whole key is shown once, when it is created. Scopes are ordered: a ``write`` key
may read, an ``admin`` key may do everything.

Dashboard sessions (``crmflow.ui_sessions``, migration 0016): logging in at ``/ui`` with a
key makes a random token, stored as its SHA-256 with the key's id and an expiry; the
browser's cookie holds the token, never the key. Revoking the key ends its sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any, Literal

import psycopg

from engine import db

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
_RANK: dict[str, int] = {scope: rank for rank, scope in enumerate(SCOPES)}
KEY_RE = re.compile(r"^cf_([0-9a-f]{12})_([A-Za-z0-9_-]{32,128})$")
# Compared against when no key has the presented prefix, so a miss costs a comparison too.
_NO_HASH = "0" * 64
# A session token: secrets.token_urlsafe(32).
SESSION_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


class ApiKeyNotFound(LookupError):
    pass


_q = db.Queries("apikeys.sql")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def allows(have: str, need: str) -> bool:
    """Whether a key of scope ``have`` may do what needs ``need`` (read < write < admin)."""
    return _RANK[have] >= _RANK[need]


def check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise ValueError("a key's name is 1 to 200 characters")
    return name


async def create(
    conn: psycopg.AsyncConnection[Any], name: str, scope: str
) -> tuple[dict[str, Any], str]:
    """Store a new key; returns its row and the key itself (the only time it is known)."""
    if scope not in _RANK:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    name = check_name(name)
    for _ in range(5):  # 48-bit prefixes: a collision is unlikely, two in a row absurd
        prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        row = await (
            await conn.execute(
                _q("insert_api_key"),
                {"name": name, "prefix": prefix, "hash": hash_secret(secret), "scope": scope},
            )
        ).fetchone()
        if row is not None:
            return row, f"cf_{prefix}_{secret}"
    raise RuntimeError("could not find a free key prefix")


async def verify(
    conn: psycopg.AsyncConnection[Any], presented: str, *, touch: bool = True
) -> dict[str, Any] | None:
    """The live key that ``presented`` is, or None (malformed, unknown, wrong or revoked)."""
    match = KEY_RE.fullmatch(presented)
    if match is None:
        return None
    prefix, secret = match.groups()
    row = await (await conn.execute(_q("api_key_by_prefix"), {"prefix": prefix})).fetchone()
    expected = row["hash"] if row is not None else _NO_HASH
    if not hmac.compare_digest(expected, hash_secret(secret)) or row is None:
        return None
    if row["revoked_at"] is not None:
        return None
    if touch:
        await conn.execute(_q("touch_api_key"), {"id": row["id"]})
    return {k: v for k, v in row.items() if k != "hash"}


async def list_keys(
    conn: psycopg.AsyncConnection[Any], include_revoked: bool = True
) -> list[dict[str, Any]]:
    return await (
        await conn.execute(_q("list_api_keys"), {"include_revoked": include_revoked})
    ).fetchall()


async def revoke(conn: psycopg.AsyncConnection[Any], key_id: int) -> dict[str, Any]:
    """Revoke a key (revoking a revoked key changes nothing); returns the key."""
    row: dict[str, Any] | None = await (
        await conn.execute(_q("revoke_api_key"), {"id": key_id})
    ).fetchone()
    if row is None:
        raise ApiKeyNotFound(key_id)
    return row


async def create_session(conn: psycopg.AsyncConnection[Any], key_id: int, ttl: float) -> str:
    """A dashboard session of key ``key_id`` for ``ttl`` seconds; returns its token (the
    cookie's value: only its SHA-256 is stored)."""
    token = secrets.token_urlsafe(32)
    await conn.execute(
        _q("insert_ui_session"), {"hash": hash_secret(token), "api_key_id": key_id, "ttl": ttl}
    )
    return token


async def session_key(
    conn: psycopg.AsyncConnection[Any], token: str, *, touch: bool = True
) -> dict[str, Any] | None:
    """The key of the live session ``token`` is, or None (malformed, unknown, logged out,
    expired, or its key revoked). The key's row, plus ``session_id`` and
    ``session_expires_at``."""
    if SESSION_TOKEN_RE.fullmatch(token) is None:
        return None
    row = await (await conn.execute(_q("ui_session_key"), {"hash": hash_secret(token)})).fetchone()
    if row is not None and touch:
        await conn.execute(_q("touch_api_key"), {"id": row["id"]})
    return row


async def end_session(conn: psycopg.AsyncConnection[Any], token: str) -> None:
    """Log out: the session ``token`` is deleted (nothing happens if there is none)."""
    if SESSION_TOKEN_RE.fullmatch(token) is not None:
        await conn.execute(_q("delete_ui_session"), {"hash": hash_secret(token)})
