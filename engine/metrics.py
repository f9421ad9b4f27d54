"""Prometheus metrics.

Two kinds:
- database-wide, read at scrape time by :class:`DatabaseCollector` (the same figures
  from the API's ``/metrics`` and from any worker): events captured and pending,
  outbox age, executions by status, dead letters (failed executions), step durations
  by action, retries, worker heartbeats, open alerts, circuit breakers per host;
- process-local counters of a worker (``crmflow worker --metrics-port``): events
  matched, executions enrolled, inline and queued step outcomes, batch durations,
  circuit breaker transitions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import REGISTRY, Collector
from psycopg.rows import dict_row

from engine import db

log = logging.getLogger(__name__)

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# ── process-local (a worker's) ──
EVENTS_MATCHED = Counter("crmflow_matcher_events", "Events claimed and matched by this process")
EXECUTIONS_ENROLLED = Counter(
    "crmflow_matcher_executions_enrolled", "Executions enrolled by this process's matcher"
)
MATCH_ERRORS = Counter(
    "crmflow_matcher_poisoned_events",
    "Events whose matching failed (recorded in outbox.match_error)",
)
BATCH_SECONDS = Histogram(
    "crmflow_matcher_batch_seconds",
    "Duration of a matcher batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
STEPS_RUN = Counter(
    "crmflow_worker_steps", "Steps run by this process", ["action", "status", "path"]
)
MATCHER_CONFLICTS = Counter(
    "crmflow_matcher_conflicts",
    "Matcher batches rolled back by a lock conflict and retried at once "
    "(kind: deadlock, serialization, lock_timeout, statement_timeout)",
    ["kind"],
)
BREAKER_TRANSITIONS = Counter(
    "crmflow_circuit_breaker_transitions",
    "Circuit breaker transitions made by this process, per target host and the state "
    "entered (open, half_open, closed)",
    ["host", "state"],
)
INLINE_FALLBACKS = Counter(
    "crmflow_inline_busy_rows",
    "Executions sent to the queue instead of running inline because their entity's row "
    "was locked by another transaction (the CRM's own, usually)",
)


class DatabaseCollector(Collector):
    """Reads the database-wide figures at each scrape (a short-lived connection)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _rows(self, conn: psycopg.Connection[Any], name: str) -> list[dict[str, Any]]:
        return conn.execute(db.query(name, "metrics.sql"), {}).fetchall()

    def collect(self) -> Iterator[Any]:
        try:
            with psycopg.connect(
                db.engine_conninfo(self.url), row_factory=dict_row, connect_timeout=5
            ) as conn:
                yield from self._collect(conn)
        except psycopg.Error as exc:
            log.warning("metrics: database unavailable: %s", exc)
            up = GaugeMetricFamily("crmflow_database_up", "1 when the database answered")
            up.add_metric([], 0)
            yield up

    def _collect(self, conn: psycopg.Connection[Any]) -> Iterator[Any]:
        up = GaugeMetricFamily("crmflow_database_up", "1 when the database answered")
        up.add_metric([], 1)
        yield up
        [events] = self._rows(conn, "events")
        captured = CounterMetricFamily(
            "crmflow_events_captured", "Events captured by the triggers (and posted)"
        )
        captured.add_metric([], events["captured"])
        yield captured
        matched = CounterMetricFamily("crmflow_events_matched", "Events matched")
        matched.add_metric([], events["captured"] - events["pending"])
        yield matched
        pending = GaugeMetricFamily("crmflow_outbox_backlog", "Events waiting to be matched")
        pending.add_metric([], events["pending"])
        yield pending
        age = GaugeMetricFamily(
            "crmflow_outbox_oldest_age_seconds", "Age of the oldest unmatched event"
        )
        age.add_metric([], float(events["oldest_age"]))
        yield age

        by_status = GaugeMetricFamily(
            "crmflow_executions", "Executions by status", labels=["status"]
        )
        dead = 0
        for r in self._rows(conn, "executions_by_status"):
            by_status.add_metric([r["status"]], r["n"])
            dead = r["n"] if r["status"] == "failed" else dead
        yield by_status
        dead_letters = GaugeMetricFamily(
            "crmflow_dead_letters", "Failed executions (retries exhausted; replayable)"
        )
        dead_letters.add_metric([], dead)
        yield dead_letters

        histogram = HistogramMetricFamily(
            "crmflow_step_duration_seconds", "Duration of finished steps", labels=["action"]
        )
        retries = CounterMetricFamily(
            "crmflow_step_retries", "Step attempts after the first", labels=["action"]
        )
        for r in self._rows(conn, "step_durations"):
            buckets = [(str(b), r["buckets"][i]) for i, b in enumerate(STEP_BUCKETS)]
            buckets.append(("+Inf", r["count"]))
            histogram.add_metric([r["action"]], buckets, sum_value=float(r["sum"] or 0))
            retries.add_metric([r["action"]], r["retries"])
        yield histogram
        yield retries

        heartbeat = GaugeMetricFamily(
            "crmflow_worker_heartbeat_age_seconds",
            "Seconds since each live worker's last heartbeat",
            labels=["worker", "host", "pid"],
        )
        for r in self._rows(conn, "worker_heartbeats"):
            heartbeat.add_metric([str(r["id"]), r["hostname"], str(r["pid"])], float(r["age"]))
        yield heartbeat

        [alerts] = self._rows(conn, "open_alerts")
        open_alerts = GaugeMetricFamily("crmflow_alerts_open", "Alerts raised and not resolved")
        open_alerts.add_metric([], alerts["n"])
        yield open_alerts

        broken = conn.execute(db.query("broken_workflows", "matcher.sql"), {}).fetchall()
        gauge = GaugeMetricFamily(
            "crmflow_workflows_broken",
            "Active workflows whose conditions no longer compile (schema drift): they match "
            "nothing until fixed",
        )
        gauge.add_metric([], len(broken))
        yield gauge
        yield from self._breakers(conn)

    def _breakers(self, conn: psycopg.Connection[Any]) -> Iterator[Any]:
        exists = conn.execute(
            "SELECT to_regclass('crmflow.circuit_breakers') IS NOT NULL AS x"
        ).fetchone()
        rows = (
            conn.execute(db.query("breakers_list", "breakers.sql")).fetchall()
            if exists and exists["x"]
            else []
        )
        state = GaugeMetricFamily(
            "crmflow_circuit_breaker_state",
            "Circuit breaker of each target host that has opened: 0 closed, 1 half-open "
            "(a probe call is out), 2 open (its steps wait)",
            labels=["host"],
        )
        opened = CounterMetricFamily(
            "crmflow_circuit_breaker_opened",
            "Times each target host's circuit breaker opened (all processes)",
            labels=["host"],
        )
        for r in rows:
            state.add_metric([r["host"]], BREAKER_STATE_VALUES[r["state"]])
            opened.add_metric([r["host"]], r["opened_total"])
        yield state
        yield opened


def render(url: str, include_process: bool = False) -> bytes:
    """The text exposition of the database metrics (and this process's, if asked)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(url))
    text = generate_latest(registry)
    if include_process:
        text += generate_latest(REGISTRY)
    return text


def serve(url: str, port: int, host: str = "0.0.0.0") -> None:
    """A worker's metrics endpoint: process counters plus the database figures."""
    from prometheus_client import start_http_server

    REGISTRY.register(DatabaseCollector(url))
    start_http_server(port, addr=host)
