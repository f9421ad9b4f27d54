"""OpenTelemetry tracing (engine/tracing.py): the span tree of an execution, and the
W3C ``traceparent`` a real HTTP server receives, with the SDK's in-memory exporter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from engine import executions, tracing
from engine.config import Settings
from engine.matcher import Matcher
from engine.runtime import Runner
from engine.worker import running_worker
from tests.helpers import apply, drive, execution_ids, steps, value, wait_executions_settled
from tests.servers import Reply, WebServer

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind

Conn = psycopg.AsyncConnection[Any]
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
LEAD_CREATED = {"type": "entity_created", "entity_type": "lead"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=tracing.execution_ids())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.reset()
        provider.shutdown()


def _hex(number: int, width: int) -> str:
    return f"{number:0{width}x}"


def in_trace(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.context is not None and _hex(s.context.trace_id, 32) == trace_id
    ]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def _lead(conn: Conn) -> int:
    return int(await value(conn, "INSERT INTO leads (name) VALUES ('Tracy') RETURNING id"))


async def test_span_tree_of_a_delay_a_retry_and_an_http_call(
    crm: Conn, matcher: Matcher, runner: Runner, web: WebServer, spans: InMemorySpanExporter
) -> None:
    await apply(
        crm,
        {
            "name": "Traced",
            "trigger": LEAD_CREATED,
            "actions": [
                {
                    "id": "hook",
                    "type": "http_request",
                    "url": web.url("/hook?token=secret"),
                    "delay": 60,
                    "retry": {"max_attempts": 3, "backoff": 0.1, "jitter": False},
                }
            ],
        },
    )
    web.reply(Reply(500, {"error": "boom"}))  # then the default 200
    await _lead(crm)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    ex = await drive(runner, crm, execution_id)
    assert ex["status"] == "completed", ex["error"]
    [step] = await steps(crm, execution_id)
    assert (step["status"], step["attempts"]) == ("succeeded", 2)

    detail = await executions.get_execution(crm, execution_id)
    trace_id = detail["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    assert trace_id == tracing.execution_trace_id(execution_id, ex["triggered_at"])

    tree = in_trace(spans, trace_id)
    [root] = [s for s in tree if s.name == "execution"]
    assert root.parent is None  # the trace's root, with the derived ids
    assert attrs(root)["crmflow.execution.id"] == execution_id
    # linked to the matcher's batch, a trace of its own
    [batch] = [s for s in spans.get_finished_spans() if s.name == "match batch"]
    assert batch.context is not None and root.context is not None
    assert [link.context.span_id for link in root.links] == [batch.context.span_id]
    assert batch.context.trace_id != root.context.trace_id

    step_spans = sorted(
        (s for s in tree if s.name == "step http_request"), key=lambda s: s.start_time or 0
    )
    for s in step_spans:
        assert s.parent is not None and s.parent.span_id == root.context.span_id
        assert attrs(s)["crmflow.step.id"] == "hook"
        assert attrs(s)["crmflow.step.type"] == "http_request"
    wait, failed, succeeded = step_spans
    assert attrs(wait)["crmflow.step.outcome"] == "waiting"
    assert [e.name for e in wait.events] == ["wait"]
    assert (attrs(failed)["crmflow.step.attempt"], attrs(failed)["crmflow.step.outcome"]) == (
        1,
        "retry",
    )
    assert [e.name for e in failed.events] == ["attempt failed", "retry"]
    assert "HTTP 500" in str((failed.events[0].attributes or {})["error"])
    assert (attrs(succeeded)["crmflow.step.attempt"], attrs(succeeded)["crmflow.step.outcome"]) == (
        2,
        "succeeded",
    )

    calls = [s for s in tree if s.kind == SpanKind.CLIENT]
    assert len(calls) == 2
    by_parent = {c.parent.span_id: c for c in calls if c.parent is not None}
    assert failed.context is not None and succeeded.context is not None
    first, second = by_parent[failed.context.span_id], by_parent[succeeded.context.span_id]
    assert attrs(first)["http.response.status_code"] == 500
    assert attrs(second)["http.response.status_code"] == 200
    assert "secret" not in str(attrs(second)["url.full"])  # no query string in the span

    # The real server received a valid traceparent naming the execution's trace and
    # the call's own span.
    assert len(web.requests) == 2
    for request, call in zip(web.requests, (first, second), strict=True):
        match = TRACEPARENT.match(request.headers["traceparent"])
        assert match is not None, request.headers["traceparent"]
        assert match.group(1) == trace_id
        assert call.context is not None
        assert match.group(2) == _hex(call.context.span_id, 16)


async def test_the_worker_batch_path_traces_calls_and_retries(
    crm: Conn, db_url: str, settings: Settings, web: WebServer, spans: InMemorySpanExporter
) -> None:
    await apply(
        crm,
        {
            "name": "Traced by the worker",
            "trigger": LEAD_CREATED,
            "actions": [
                {"id": "tag", "type": "update_field", "field": "source", "value": "traced"},
                {
                    "id": "hook",
                    "type": "http_request",
                    "url": web.url(),
                    "retry": {"max_attempts": 3, "backoff": 0.1, "jitter": False},
                },
            ],
        },
    )
    web.reply(Reply(500, {"error": "boom"}))
    await _lead(crm)
    # not inline in the matcher: the database step runs set-based in the worker's batch
    no_inline = Settings.model_validate({**settings.model_dump(), "inline_steps": False})
    async with running_worker(db_url, settings=no_inline, concurrency=2):
        [ex] = await wait_executions_settled(crm, expected=1)
    assert ex["status"] == "completed", ex["error"]
    trace_id = tracing.execution_trace_id(ex["id"], ex["triggered_at"])
    tree = in_trace(spans, trace_id)
    names = sorted(s.name for s in tree)
    assert names.count("execution") == 1
    assert names.count("step update_field") == 1
    hooks = [s for s in tree if s.name == "step http_request"]
    assert sorted(str(attrs(s)["crmflow.step.outcome"]) for s in hooks) == ["retry", "succeeded"]
    assert len([s for s in tree if s.kind == SpanKind.CLIENT]) == 2
    for request in web.requests:
        match = TRACEPARENT.match(request.headers["traceparent"])
        assert match is not None and match.group(1) == trace_id


async def test_tracing_off_sends_no_traceparent(
    crm: Conn, matcher: Matcher, runner: Runner, web: WebServer
) -> None:
    assert not tracing.enabled()
    await apply(
        crm,
        {
            "name": "Untraced",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "http_request", "url": web.url()}],
        },
    )
    await _lead(crm)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    ex = await drive(runner, crm, execution_id)
    assert ex["status"] == "completed", ex["error"]
    [request] = web.requests
    assert "traceparent" not in request.headers
    # the trace id is shown all the same (derived from the execution)
    detail = await executions.get_execution(crm, execution_id)
    assert detail["trace_id"] == tracing.execution_trace_id(execution_id, ex["triggered_at"])


def test_trace_ids_are_stable_and_distinct() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert tracing.execution_trace_id(7, at) == tracing.execution_trace_id(7, at)
    assert tracing.execution_trace_id(7, at) != tracing.execution_trace_id(8, at)
    assert tracing.execution_trace_id(7, at) != tracing.execution_trace_id(
        7, at.replace(microsecond=678902)
    )


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def test_off_without_otel_environment_imports_no_opentelemetry() -> None:
    code = (
        "import sys, engine.executor.runner, engine.tracing as t\n"
        "assert not t.enabled()\n"
        "assert not any(m.startswith('opentelemetry') for m in sys.modules), "
        "[m for m in sys.modules if m.startswith('opentelemetry')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_clean_env())


def test_on_with_the_otel_environment() -> None:
    code = (
        "import engine.tracing as t\n"
        "assert t.enabled()\n"
        "with t.call_span('http_request', 'GET', 'http://x.test/a') as c:\n"
        "    assert c.traceparent and c.traceparent.startswith('00-')\n"
    )
    env = _clean_env(OTEL_TRACES_EXPORTER="console")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    off = _clean_env(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:1", OTEL_SDK_DISABLED="true")
    subprocess.run(
        [sys.executable, "-c", "import engine.tracing as t; assert not t.enabled()"],
        check=True,
        env=off,
    )


def test_tracing_off_costs_next_to_nothing() -> None:
    """The no-op helpers around one step (a span, an outcome, a call): well under a
    microsecond each (the figure is printed with -s)."""
    assert not tracing.enabled()

    class Ctx:
        execution_id, step_id, attempt = 1, "s", 1

    ctx = Ctx()
    n = 100_000
    started = time.perf_counter()
    for _ in range(n):
        with tracing.step_span(ctx):
            tracing.step_outcome(1, "s", "skipped")
        with tracing.call_span("http_request", "POST", "http://x.test") as call:
            assert call.traceparent is None
    per_step = (time.perf_counter() - started) / n
    print(f"tracing off: {per_step * 1e6:.2f} µs per step (span, outcome, call)")
    assert per_step < 20e-6


async def test_the_trace_id_in_the_api_the_dashboard_and_the_cli(
    crm: Conn,
    matcher: Matcher,
    runner: Runner,
    web: WebServer,
    api_app: Any,
    api_keys: dict[str, str],
    db_url: str,
) -> None:
    import httpx

    await apply(
        crm,
        {
            "name": "Shown",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "http_request", "url": web.url()}],
        },
    )
    await _lead(crm)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    ex = await drive(runner, crm, execution_id)
    trace_id = tracing.execution_trace_id(execution_id, ex["triggered_at"])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api_app), base_url="http://testserver"
    ) as client:
        auth = {"Authorization": f"Bearer {api_keys['read']}"}
        detail = (await client.get(f"/executions/{execution_id}", headers=auth)).json()
        assert detail["trace_id"] == trace_id
        login = await client.post(
            "/ui/login", data={"key": api_keys["read"]}, headers={"Origin": "http://testserver"}
        )
        assert login.status_code == 303, login.text
        page = await client.get(f"/ui/executions/{execution_id}")
        assert page.status_code == 200
        assert f'data-trace-id="{trace_id}"' in page.text
        assert f'<code id="trace-id">{trace_id}</code>' in page.text
    shown = subprocess.run(
        [sys.executable, "-m", "engine.cli", "executions", "show", str(execution_id)],
        capture_output=True,
        text=True,
        env=_clean_env(CRMFLOW_DATABASE_URL=db_url, COLUMNS="200"),
    )
    assert shown.returncode == 0, shown.stderr
    assert f"trace {trace_id}" in shown.stdout


async def test_the_execution_links_to_the_writers_traceparent(
    crm: Conn, matcher: Matcher, spans: InMemorySpanExporter
) -> None:
    await apply(
        crm,
        {
            "name": "Linked",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "http_request", "url": "http://127.0.0.1:9/never"}],
        },
    )
    writer_trace, writer_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    # off by default (the writer pays nothing): nothing is kept
    async with crm.transaction():
        await crm.execute("SET LOCAL crmflow.traceparent = 'kept only when asked'")
        await _lead(crm)
    await crm.execute("SELECT crmflow.keep_writer_traceparent(true)")
    async with crm.transaction():
        await crm.execute(
            "SELECT set_config('crmflow.traceparent', %s, true)",
            [f"00-{writer_trace}-{writer_span}-01"],
        )
        await _lead(crm)
    await _lead(crm)  # a write without a traceparent
    # a malformed one is kept in the outbox but not linked
    async with crm.transaction():
        await crm.execute("SET LOCAL crmflow.traceparent = 'not a traceparent'")
        await _lead(crm)
    kept = await value(
        crm,
        "SELECT array_agg(traceparent ORDER BY id) FROM crmflow.outbox"
        " WHERE op = 'insert' AND entity_type = 'lead'",
    )
    assert kept == [None, f"00-{writer_trace}-{writer_span}-01", None, "not a traceparent"]
    await matcher.drain()
    roots = sorted(
        (s for s in spans.get_finished_spans() if s.name == "execution"),
        key=lambda s: attrs(s)["crmflow.execution.id"],
    )
    assert len(roots) == 4
    writer_links = [
        [
            (_hex(link.context.trace_id, 32), _hex(link.context.span_id, 16))
            for link in root.links
            if (link.attributes or {}).get("crmflow.link") == "writer"
        ]
        for root in roots
    ]
    assert writer_links == [[], [(writer_trace, writer_span)], [], []]


def test_traceparent_parsing() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert tracing.parse_traceparent(good) == (
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        1,
    )
    for bad in (
        None,
        "",
        "01-" + good[3:],
        good[:-1],
        good.replace("4bf9", "xyz9"),
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
    ):
        assert tracing.parse_traceparent(bad) is None


async def test_enrich_lead_sends_the_traceparent_of_its_call(
    crm: Conn,
    matcher: Matcher,
    pool: Any,
    settings: Settings,
    web: WebServer,
    spans: InMemorySpanExporter,
) -> None:
    web.default = Reply(200, {"company": "Initech"})
    await apply(
        crm,
        {"name": "Enriched", "trigger": LEAD_CREATED, "actions": [{"type": "enrich_lead"}]},
    )
    await value(
        crm, "INSERT INTO leads (name, email) VALUES ('Eve', 'eve@initech.test') RETURNING id"
    )
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    runner = Runner(
        pool,
        Settings.model_validate({**settings.model_dump(), "enrichment_url": web.url("/enrich")}),
    )
    ex = await drive(runner, crm, execution_id)
    assert ex["status"] == "completed", ex["error"]
    trace_id = tracing.execution_trace_id(execution_id, ex["triggered_at"])
    [call] = [s for s in in_trace(spans, trace_id) if s.kind == SpanKind.CLIENT]
    assert call.name == "POST enrich_lead" and call.context is not None
    [request] = web.requests
    assert request.headers["traceparent"] == f"00-{trace_id}-{_hex(call.context.span_id, 16)}-01"


async def test_a_manual_run_starts_the_executions_traces(
    crm: Conn, runner: Runner, spans: InMemorySpanExporter
) -> None:
    from engine.scheduler import run_now

    workflow_id = await apply(
        crm,
        {
            "name": "Ping",
            "trigger": {"type": "manual"},
            "actions": [{"type": "send_notification", "recipient": 1, "message": "hi"}],
        },
    )
    [execution_id] = await run_now(crm, workflow_id)
    ex = await drive(runner, crm, execution_id)
    assert ex["status"] == "completed", ex["error"]
    detail = await executions.get_execution(crm, execution_id)
    tree = in_trace(spans, detail["trace_id"])
    [root] = [s for s in tree if s.name == "execution"]
    [source] = [s for s in spans.get_finished_spans() if s.name == "manual run"]
    assert source.context is not None and root.context is not None
    assert [link.context.span_id for link in root.links] == [source.context.span_id]
    [step] = [s for s in tree if s.name == "step send_notification"]
    assert step.parent is not None and step.parent.span_id == root.context.span_id
    assert attrs(step)["crmflow.step.outcome"] == "succeeded"
