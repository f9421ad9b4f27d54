"""The bench's queued-path cases (Q1-Q3) give figures, and ``--peers`` degrades gracefully:
a peer that cannot be installed is skipped with the reason, a job whose worker fails is
reported, and neither fails the bench (docs/design.md, Targets)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from typing import Any

import pytest
from rich.console import Console

from bench import harness, peers
from bench.cli import render, render_peers
from bench.targets import q1, q2, q3


@pytest.fixture
def bench_server(server_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The bench's scratch databases on the test suite's server."""
    monkeypatch.setattr(harness, "server_url", lambda: server_url)
    return server_url


async def test_queued_cases_produce_figures(bench_server: str) -> None:
    events = 60
    r1, r2, r3 = await q1(True, events), await q2(True, events), await q3(True, events)
    assert r1.id == "Q1" and r1.value > 0
    assert r1.detail["delayed_steps_run"] == events
    assert r1.detail["statuses"] == {"completed": events}
    late = r1.detail["late_p99_s"]
    assert late is not None and r1.detail["late_p50_s"] <= late <= r1.detail["late_max_s"]
    # A 5 s delay never runs early, whatever the due time is taken from.
    assert r1.detail["late_p50_s"] > -0.05
    assert r2.value > 0 and r2.detail["calls"] >= events and r2.detail["keys"] == events
    assert r2.detail["duplicate_calls"] == r2.detail["calls"] - events
    assert r2.detail["statuses"] == {"completed": events}
    assert r3.value > 0 and r3.detail["steps"] == 4 * events
    out = io.StringIO()
    render([r1, r2, r3], 1.0, Console(file=out, width=400))
    text = out.getvalue()
    assert "Q1" in text and "late p50" in text and "duplicate calls" in text and "Q3" in text
    for r in (r1, r2, r3):
        assert json.dumps(r.as_json())  # --json can carry them


def _failing_worker_peer() -> peers.Peer:
    async def install(url: str) -> None:
        return None

    return peers.Peer(
        "broken-peer",
        "PERFORM 1",
        "SELECT 1",
        lambda: None,
        lambda: "0.0",
        install,
        lambda url, hook: ([sys.executable, "-c", "raise SystemExit('no worker here')"], None),
    )


def _uninstallable_peer() -> peers.Peer:
    async def install(url: str) -> None:
        raise RuntimeError("schema refused")

    return peers.Peer(
        "uninstallable",
        "PERFORM 1",
        "SELECT 1",
        lambda: None,
        lambda: "0.0",
        install,
        lambda url, hook: (["false"], None),
    )


async def test_peers_degrade_gracefully(bench_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # No node on PATH, pgqueuer not importable: both skipped, with the reason.
    which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name in ("node", "npm") else which(name)
    )
    monkeypatch.setitem(sys.modules, "pgqueuer", None)
    monkeypatch.setattr(peers, "sizes", lambda quick: peers.Sizes(20, 20, 20, 5, 1, 1, 1, 30))

    async def crmflow_figures(quick: bool, results: dict[str, Any], progress: Any = None) -> dict:
        return {"burst_rate": 100.0, "latency_p50_ms": 2.0}

    monkeypatch.setattr(peers, "crmflow_figures", crmflow_figures)
    graphile, pgqueuer = (
        next(p for p in peers.PEERS if p.name == n) for n in ("graphile-worker", "pgqueuer")
    )
    out = await peers.run_peers(
        True, {}, peers=[graphile, pgqueuer, _uninstallable_peer(), _failing_worker_peer()]
    )
    reports = {r.name: r for r in out["peers"]}
    assert reports["graphile-worker"].skipped == "node is not on PATH"
    assert "pgqueuer is not installed" in (reports["pgqueuer"].skipped or "")
    assert "schema refused" in (reports["uninstallable"].skipped or "")
    broken = reports["broken-peer"]
    assert broken.skipped is None
    assert {"burst", "delayed", "http", "latency"} <= set(broken.errors)
    assert "no worker here" in broken.errors["burst"]
    assert "writers_non_matching" in broken.figures  # pgbench needs no worker
    text = io.StringIO()
    render_peers(out, Console(file=text, width=250))
    printed = text.getvalue()
    assert "peer graphile-worker skipped: node is not on PATH" in printed
    assert "peer broken-peer, job burst failed" in printed
    as_json = peers.as_json(out)
    assert as_json["pgqueuer"]["skipped"] and as_json["broken-peer"]["errors"]


async def test_no_peer_no_crmflow_run(bench_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every peer skipped, --peers measures nothing more for crmflow."""

    async def crmflow_figures(*args: Any, **kwargs: Any) -> dict:
        raise AssertionError("crmflow's side is measured only for a peer that ran")

    monkeypatch.setattr(peers, "crmflow_figures", crmflow_figures)
    out = await peers.run_peers(True, {}, peers=[_uninstallable_peer()])
    assert out["crmflow"] == {} and out["peers"][0].skipped
