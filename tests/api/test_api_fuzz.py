"""Schemathesis over every operation of the OpenAPI document, in-process against the app
on a real database (the example CRM watched, the seed workflows, some executions), with
an admin key: no 5xx, and every response conforms to the schema (status, content type,
body, headers). Bounded to stay under a minute."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi

from api.main import create_app
from engine import apikeys, db
from engine.config import Settings
from engine.scheduler import run_now
from engine.seed import seed

# A fixed admin key, known to schemathesis when it generates cases (the configuration)
# and when it checks them (explicit credentials, which ignored_auth removes and spoils).
FUZZ_PREFIX, FUZZ_SECRET = "f00df00df00d", "fuzz" * 11
AUTH = {"Authorization": f"Bearer cf_{FUZZ_PREFIX}_{FUZZ_SECRET}"}
MAX_EXAMPLES = int(os.environ.get("CRMFLOW_FUZZ_EXAMPLES", "25"))
# positive_data_acceptance expects every schema-valid request to succeed. Here a
# schema-valid body can name an entity that is not watched, a field it does not have,
# a key that does not exist: the engine refuses those with a 422 naming the path, by
# design (the catalog lives in the database, not in the OpenAPI document). Every other
# check runs, negative_data_rejection included.
NOT_APPLICABLE = [schemathesis.checks.positive_data_acceptance]


async def _prepare(url: str, settings: Settings) -> None:
    """The example CRM with data, the seed workflows, executions, and an admin key."""
    async with await db.connect(url, autocommit=True) as conn:
        results = (await seed(conn, settings)).workflows  # and its example users
        await conn.execute(
            "INSERT INTO leads (name, source, owner_id) VALUES ('A', 'website_form', 1),"
            " ('B', 'referral', 1);"
            "INSERT INTO deals (name, amount, owner_id, last_activity_at) VALUES"
            " ('Old deal', 100, 1, now() - interval '30 days')"
        )
        scheduled = next(r for r in results if r.name == "Follow up on stale deals")
        await run_now(conn, scheduled.id, settings=settings)
        # Far from the ids the fuzzer tries, so DELETE /apikeys/{id} does not revoke it.
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('crmflow.api_keys', 'id'), 987654320)"
        )
        await conn.execute(
            "INSERT INTO crmflow.api_keys (name, prefix, hash, scope)"
            " VALUES ('fuzz', %s, %s, 'admin')",
            [FUZZ_PREFIX, apikeys.hash_secret(FUZZ_SECRET)],
        )


@pytest.fixture
def fuzz_client(db_url: str, settings: Settings) -> Iterator[asgi.ASGIClient]:
    """An in-process client of the app on this test's database."""
    asyncio.run(_prepare(db_url, settings))
    with asgi.get_client(create_app(settings)) as client:  # runs the app's lifespan
        yield client
    # The lifespan runs in schemathesis' own event loop until it is ended: end it (so
    # the app closes its pool) before the database is dropped.
    asgi.shutdown_lifespans()


# The document does not depend on the database: it is loaded from an app made offline,
# and each test sends to its own app (schemathesis' lazy loader,
# schemathesis.pytest.from_fixture, fails on pytest 9.2: it sets Node._nodeid).
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
schema.config.update(base_url="http://testserver", headers=AUTH)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="CRMFLOW_FUZZ_EXAMPLES" not in os.environ,
)
def test_api_conforms_to_its_schema(case: Any, fuzz_client: asgi.ASGIClient) -> None:
    # This test's app, for the call and for the checks' own probes (ignored_auth...).
    case.operation.app = case.operation.schema.app = fuzz_client.app
    case.call_and_validate(headers=AUTH, excluded_checks=NOT_APPLICABLE)
