"""OpenTelemetry tracing: a trace per execution, spans for its enrollment, steps and calls.

The only module that imports OpenTelemetry (the optional extra ``crmflow[tracing]``).
Tracing is off unless the standard environment asks for it (``OTEL_TRACES_EXPORTER``,
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; see
docs/operations.md) or a test installs a provider (:func:`use_provider`). Off, every
helper returns at its first line and nothing of OpenTelemetry is imported.

An execution's trace id is derived from the execution (its id and ``triggered_at``),
so every process that touches it (the matcher that enrolls it, any worker that runs one
of its steps, the API and CLI that show it) names the same trace with no stored state:
:func:`execution_trace_id`. The trace's root span, ``execution``, has a derived span id
too; it is emitted at enrollment (:func:`enrolled`), linked to the matcher batch's span.
Each step attempt is a child of the root (attributes: step id, type, attempt,
outcome; failed attempts, retries, breaker holds and delays as span events), and each
external call a child of its step, whose W3C ``traceparent`` the call sends.
When the CRM's write set ``crmflow.traceparent`` (kept in the outbox, migration 0021),
the root span links to the writer's span too.

Why this is long (about 550 lines): it is one adapter around one piece of state. Every
helper reads the same module globals at its first line (``_state``, ``_tracer``, the
step spans kept open in ``_open``, the ids ``_forced`` on the next root span), which
:func:`configure`, :func:`use_provider` and :func:`reset` rebind; and the sections
below (on or off, the execution's ids, enrollment, steps, external calls) are a few
short functions each that share the private helpers ``_execution``, ``_root_context``
and ``_attributes``. Split into modules, each would read the others' private state,
and the boundary the engine relies on (no other module imports OpenTelemetry, off
imports none of it: ``tests/report/test_tracing.py``) would run through several files.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
# Spans of external steps kept open between the call and its record (batch path).
_MAX_OPEN = 10_000

_tracer: Any = None
_state = False
_open: OrderedDict[tuple[int, str], _Step] = OrderedDict()
# Ids the next span takes (the execution's root span, see execution_ids).
_forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "crmflow_forced_ids", default=None
)


@dataclass
class _Step:
    span: Any
    ctx: Any
    outcome: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ───────── on or off ─────────


def _wanted() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _configure() -> bool:
    """Set up the SDK from the OTEL_* environment; False when tracing is not asked for."""
    if not _wanted():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    exporter: Any
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        )
        if protocol.strip() == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
        exporter = OTLPSpanExporter()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "crmflow")})
    provider = TracerProvider(resource=resource, id_generator=execution_ids())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use_provider(provider)
    return True


def enabled() -> bool:
    return bool(_state)


def configure() -> bool:
    """Read the OTEL_* environment again (done once at import); whether tracing is on."""
    global _state
    try:
        _state = _configure()
    except ImportError as exc:  # asked for, but the extra is not installed
        log.warning("tracing is configured but unavailable (pip install crmflow[tracing]): %s", exc)
        _state = False
    return _state


def use_provider(provider: Any) -> None:
    """Trace into ``provider`` (an SDK ``TracerProvider``; tests give one with an
    in-memory exporter, and ``id_generator=execution_ids()`` for the execution's root)."""
    global _tracer, _state
    _tracer = provider.get_tracer("crmflow")
    _state = True


def reset() -> None:
    """Off again (tests)."""
    global _tracer, _state
    _tracer, _state = None, False
    _open.clear()


def execution_ids() -> Any:
    """An SDK id generator that gives the execution's root span its derived ids."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class _ExecutionIds(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            forced = _forced.get()
            return forced[0] if forced else super().generate_trace_id()

        def generate_span_id(self) -> int:
            forced = _forced.get()
            if forced:
                _forced.set(None)
                return forced[1]
            return super().generate_span_id()

    return _ExecutionIds()


# ───────── the execution's ids ─────────


def _ids(execution_id: int, triggered_at: datetime | None) -> tuple[int, int]:
    micros = 0
    if triggered_at is not None:
        at = triggered_at if triggered_at.tzinfo else triggered_at.replace(tzinfo=UTC)
        micros = (at - _EPOCH) // _MICRO
    digest = hashlib.sha256(f"crmflow.execution:{execution_id}:{micros}".encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


def execution_trace_id(execution_id: int, triggered_at: datetime | None) -> str:
    """The execution's trace id, 32 hex digits (the same with tracing on or off)."""
    return f"{_ids(execution_id, triggered_at)[0]:032x}"


def _execution(ex: Mapping[str, Any]) -> tuple[int, int]:
    return _ids(int(ex["id"]), ex.get("triggered_at"))


def _root_context(ex: Mapping[str, Any]) -> Any:
    from opentelemetry import trace

    trace_id, span_id = _execution(ex)
    parent = trace.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def _attributes(ex: Mapping[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {"crmflow.execution.id": int(ex["id"])}
    if ex.get("workflow_id") is not None:
        attributes["crmflow.workflow.id"] = int(ex["workflow_id"])
    if ex.get("entity_type"):
        attributes["crmflow.entity.type"] = str(ex["entity_type"])
    return attributes


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat()


# ───────── matching and enrollment ─────────


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_WRITERS = (
    "SELECT id, traceparent FROM crmflow.outbox WHERE id = ANY(%(ids)s) AND traceparent IS NOT NULL"
)


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a W3C ``traceparent``; None if it is not one."""
    match = _TRACEPARENT.match((value or "").strip().lower())
    if match is None:
        return None
    trace_id, span_id = int(match.group(1), 16), int(match.group(2), 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(match.group(3), 16)


async def _writers(conn: Any, executions: list[dict[str, Any]]) -> dict[int, Any]:
    """The writers' spans of the events that enrolled ``executions`` (the outbox's
    ``traceparent``, from the writer's ``SET LOCAL crmflow.traceparent``), by event."""
    from opentelemetry import trace

    ids = sorted({int(e["event_id"]) for e in executions if e.get("event_id") is not None})
    if not ids:
        return {}
    try:
        async with conn.transaction():  # a savepoint: a failure leaves the batch alone
            rows = await (await conn.execute(_WRITERS, {"ids": ids})).fetchall()
    except Exception as exc:
        log.debug("the writers' traceparents were not read: %s", exc)
        return {}
    found = {}
    for row in rows:
        event_id, value = (row["id"], row["traceparent"]) if isinstance(row, dict) else row
        parsed = parse_traceparent(value)
        if parsed is not None:
            found[int(event_id)] = trace.SpanContext(
                parsed[0], parsed[1], is_remote=True, trace_flags=trace.TraceFlags(parsed[2])
            )
    return found


async def enrolled(conn: Any, executions: list[dict[str, Any]], started: int = 0) -> None:
    """A matcher batch that enrolled ``executions`` (``conn``: the batch's connection):
    a ``match batch`` span (its own trace, from ``started``, :func:`clock`) and the root
    span of each new execution's trace, linked to it and to the CRM writer's span when
    the write carried one."""
    if not _state or not executions:
        return
    _roots(executions, await _writers(conn, executions), started, "match batch")


def enrolled_by(
    source: str, execution_ids: list[int], triggered_at: datetime, workflow_id: int
) -> None:
    """Executions enrolled by a schedule tick or a manual run (``source`` names the
    span the roots link to), all triggered at ``triggered_at``."""
    if not _state or not execution_ids:
        return
    executions = [
        {"id": i, "triggered_at": triggered_at, "workflow_id": workflow_id, "status": "pending"}
        for i in execution_ids
    ]
    _roots(executions, {}, 0, source)


def _roots(
    executions: list[dict[str, Any]], writers: dict[int, Any], started: int, source: str
) -> None:
    from opentelemetry import context, trace

    batch = _tracer.start_span(
        source,
        context=context.Context(),
        start_time=started or None,
        attributes={"crmflow.executions.enrolled": len(executions)},
    )
    batch_link = trace.Link(batch.get_span_context(), {"crmflow.link": source})
    forcing = type(getattr(_tracer, "id_generator", None)).__name__ == "_ExecutionIds"
    for ex in executions:
        links = [batch_link]
        writer = writers.get(int(ex["event_id"])) if ex.get("event_id") is not None else None
        if writer is not None:
            links.append(trace.Link(writer, {"crmflow.link": "writer"}))
        ids = _execution(ex)
        if forcing:
            _forced.set(ids)
            parent = context.Context()
        else:  # another id generator: a child of the (virtual) root
            parent = _root_context(ex)
        span = _tracer.start_span(
            "execution", context=parent, links=links, attributes=_attributes(ex)
        )
        _forced.set(None)
        span.set_attribute("crmflow.execution.status", str(ex.get("status") or ""))
        span.end()
    batch.end()


# ───────── steps ─────────


class _Nothing:
    """The context manager of tracing off: enters and leaves at no cost."""

    __slots__ = ("value",)

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


_NOTHING = _Nothing()


def step_span(ctx: Any, keep_open: bool = False) -> AbstractContextManager[None]:
    """One attempt of a step (``ctx``: its StepContext), current while it runs. Its
    outcome: set by :func:`step_outcome` / :func:`step_failed`, else from how it ended.
    ``keep_open``: the span stays open for :func:`step_end` (the batch path records
    the outcome after the calls)."""
    if not _state:
        return _NOTHING
    return _step_span(ctx, keep_open)


@contextmanager
def _step_span(ctx: Any, keep_open: bool) -> Iterator[None]:
    from opentelemetry import trace

    key = (ctx.execution_id, ctx.step_id)
    attributes = _attributes(ctx.execution)
    attributes.update({"crmflow.step.id": ctx.step_id, "crmflow.step.type": ctx.step.type})
    span = _tracer.start_span(
        f"step {ctx.step.type}", context=_root_context(ctx.execution), attributes=attributes
    )
    record = _Step(span, ctx)
    _open[key] = record
    while len(_open) > _MAX_OPEN:
        _open.popitem(last=False)
    token = trace.use_span(span, end_on_exit=False)
    token.__enter__()
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        token.__exit__(None, None, None)
        # a retry later (StepRetryLater) is the runner's control flow, not an error
        retry = type(error).__name__ == "StepRetryLater"
        if error is not None and not retry and record.outcome is None:
            span.record_exception(error)
        if not keep_open and _open.get(key) is record:
            if record.outcome is not None or error is None:
                _close(key, record, record.outcome or "succeeded")
            else:
                _close(key, record, "retry" if retry else "error")


def _close(key: tuple[int, str], record: _Step, outcome: str) -> None:
    _open.pop(key, None)
    span = record.span
    span.set_attribute("crmflow.step.attempt", int(getattr(record.ctx, "attempt", 0) or 0))
    span.set_attribute("crmflow.step.outcome", outcome)
    if outcome in ("failed", "error"):
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR))
    span.end()


def step_outcome(execution_id: int, step_id: str, outcome: str, **event: Any) -> None:
    """Name the outcome of the step's open attempt (``skipped``, ``held``, ...); with
    ``event``'s attributes, an event of that name too."""
    if not _state:
        return
    record = _open.get((execution_id, step_id))
    if record is None:
        return
    record.outcome = outcome
    if event:
        record.span.add_event(outcome, {k: str(v) for k, v in event.items()})


def step_failed(execution_id: int, step_id: str, error: str, retry_at: datetime | None) -> None:
    """A failed attempt: an ``attempt failed`` event, and a ``retry`` event when another
    attempt is scheduled (the wait is until ``retry_at``)."""
    if not _state:
        return
    record = _open.get((execution_id, step_id))
    if record is None:
        return
    record.span.add_event("attempt failed", {"error": error[:1000]})
    if retry_at is not None:
        record.span.add_event("retry", {"crmflow.retry_at": _when(retry_at)})
    record.outcome = "retry" if retry_at is not None else "failed"


def step_end(
    execution_id: int, step_id: str, status: str, error: str | None, retry_at: datetime | None
) -> None:
    """The batch path's record of an external step: ends its span kept open."""
    if not _state:
        return
    record = _open.get((execution_id, step_id))
    if record is None:
        return
    if error:
        record.span.add_event("attempt failed", {"error": error[:1000]})
    if retry_at is not None:
        record.span.add_event(
            "held" if status == "held" else "retry", {"crmflow.retry_at": _when(retry_at)}
        )
    outcome = {"scheduled": "retry"}.get(status, status)
    _close((execution_id, step_id), record, outcome)


def step_waits(ex: Mapping[str, Any], step_id: str, step_type: str, until: datetime) -> None:
    """A step's delay: a short span with a ``wait`` event (until when)."""
    if not _state:
        return
    attributes = _attributes(ex)
    attributes.update(
        {
            "crmflow.step.id": step_id,
            "crmflow.step.type": step_type,
            "crmflow.step.outcome": "waiting",
        }
    )
    span = _tracer.start_span(f"step {step_type}", context=_root_context(ex), attributes=attributes)
    span.add_event("wait", {"crmflow.until": _when(until)})
    span.end()


def delays_scheduled(delays: list[tuple[Any, str, datetime]]) -> None:
    """The batch path's delays: (item, step id, until), a :func:`step_waits` each."""
    if not _state:
        return
    for item, step_id, until in delays:
        step_waits(item.ex, step_id, item.plan.steps[step_id].type, until)


def steps_recorded(
    done: list[tuple[Mapping[str, Any], int, str]], step_id: str, step_type: str, started: int
) -> None:
    """A database step run set-based for a group: one span per execution, from
    ``started`` (:func:`clock`) until now; ``done``: (execution, attempt, outcome)."""
    if not _state:
        return
    for ex, attempt, outcome in done:
        attributes = _attributes(ex)
        attributes.update(
            {
                "crmflow.step.id": step_id,
                "crmflow.step.type": step_type,
                "crmflow.step.attempt": attempt,
                "crmflow.step.outcome": outcome,
                "crmflow.step.group": len(done),
            }
        )
        span = _tracer.start_span(
            f"step {step_type}",
            context=_root_context(ex),
            attributes=attributes,
            start_time=started,
        )
        span.end()


def clock() -> int:
    """Now in nanoseconds when tracing is on (a span's start), else 0."""
    if not _state:
        return 0
    import time

    return time.time_ns()


# ───────── external calls ─────────


class Call:
    """An external call's span: ``traceparent`` to send (None: tracing off)."""

    traceparent: str | None = None

    def status(self, code: int) -> None:
        pass


_NO_CALL = Call()


class _LiveCall(Call):
    def __init__(self, span: Any) -> None:
        context = span.get_span_context()
        flags = int(context.trace_flags)
        self.traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
        self.span = span

    def status(self, code: int) -> None:
        self.span.set_attribute("http.response.status_code", code)
        if code >= 500:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR))


_NO_CALL_SPAN = _Nothing(_NO_CALL)


def call_span(name: str, method: str, url: str) -> AbstractContextManager[Call]:
    """An HTTP call out (a CLIENT span, child of the current step's span)."""
    if not _state:
        return _NO_CALL_SPAN
    return _call_span(name, method, url)


@contextmanager
def _call_span(name: str, method: str, url: str) -> Iterator[Call]:
    from urllib.parse import urlsplit

    from opentelemetry.trace import SpanKind

    parts = urlsplit(url)
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "server.address": parts.hostname or "",
        "url.full": f"{parts.scheme}://{parts.netloc}{parts.path}",  # no query: secrets
        "crmflow.action": name,
    }
    if parts.port:
        attributes["server.port"] = parts.port
    with _tracer.start_as_current_span(
        f"{method} {name}", kind=SpanKind.CLIENT, attributes=attributes
    ) as span:
        yield _LiveCall(span)


configure()
