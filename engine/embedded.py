"""The embedded PostgreSQL used when no ``CRMFLOW_DATABASE_URL`` is set.

The ``pgserver`` wheel ships PostgreSQL binaries and runs them as any user, root
included, so a fresh machine with only Python can run the demo and the tests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from engine.config import Settings, get_settings

log = logging.getLogger(__name__)

_servers: dict[Path, Any] = {}


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the embedded server in ``data_dir``; return its server URL."""
    from pgserver.postgres_server import get_server  # imported lazily: starting it is the only use

    data_dir = data_dir.resolve()
    if data_dir not in _servers:
        data_dir.mkdir(parents=True, exist_ok=True)
        log.info("starting embedded PostgreSQL in %s", data_dir)
        _servers[data_dir] = get_server(data_dir, cleanup_mode="stop")
    return str(_servers[data_dir].get_uri())


def ensure_database(server_url: str, dbname: str) -> str:
    """Create ``dbname`` on the server if missing; return a URL that points at it."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    params = conninfo_to_dict(server_url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def resolve_database_url(settings: Settings | None = None, dbname: str = "crmflow") -> str:
    """The configured URL, or an embedded server's database when none is configured."""
    settings = settings or get_settings()
    if settings.database_url:
        return settings.database_url
    return ensure_database(start_embedded(settings.embedded_data_dir), dbname)
