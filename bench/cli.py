"""``crmflow bench [--quick] [--json] [--only P3,Q1] [--peers]``: a table (or JSON) of the
targets, and with ``--peers`` the same jobs on the peers (bench/peers.py)."""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.targets import Result, run_all


def _machine() -> dict[str, str]:
    import os

    return {
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "platform": platform.platform(),
    }


# What a failed secondary condition is called in the verdict column.
MISSES = {
    "p99_pass": "p99",
    "lost_pass": "events lost",
    "matching_pass": "matching rows",
    "late_pass": "late",
    "duplicates_pass": "duplicates",
    "all_ran_pass": "steps missing",
    "completed_pass": "not completed",
    "all_steps_pass": "steps missing",
}


def render(results: list[Result], seconds: float, console: Console) -> None:
    table = Table(title=f"crmflow bench ({seconds:.0f} s)", title_justify="left")
    for column in ("id", "what", "target", "measured", ""):
        table.add_column(column)
    for r in results:
        sign = "≥" if r.higher_is_better else "≤"
        measured = r.measured_text or f"{r.value:,.2f} {r.unit}"
        if "p99_ms" in r.detail:
            measured += f" (p99 {r.detail['p99_ms']} ms)"
        verdict = "[green]pass[/]" if r.passed else "[red]miss[/]"
        failed = [MISSES.get(k, k) for k, v in r.detail.items() if k.endswith("_pass") and not v]
        if failed:
            verdict = f"[red]miss ({', '.join(failed)})[/]"
        target = r.target_text or f"{sign} {r.target:g} {r.unit}"
        table.add_row(r.id, r.what, target, measured, verdict)
    console.print(table)


def render_peers(out: dict[str, Any], console: Console) -> None:
    from bench.peers import FIGURES, ahead, ratio

    crmflow = out["crmflow"]
    reports = [r for r in out["peers"] if r.skipped is None]
    table = Table(
        title="peers: the same jobs, one worker process, concurrency 10; ÷ is crmflow ÷ peer"
        " (green: crmflow ahead); writers: tps with the trigger ÷ without",
        title_justify="left",
    )
    table.add_column("job")
    table.add_column("crmflow", justify="right")
    for r in reports:
        table.add_column(f"{r.name}\n{r.version}", justify="right")
        table.add_column("÷", justify="right")
    for key, what, _higher in FIGURES:
        count = key == "http_duplicates"
        cells = [what, _fmt(crmflow.get(key), count)]
        for r in reports:
            cells.append(_fmt(r.figures.get(key), count))
            q = ratio(crmflow, r, key)
            cells.append("" if q is None else f"[{'green' if ahead(key, q) else 'red'}]{q:.2f}[/]")
        table.add_row(*cells)
    if reports:
        console.print(table)
    for r in out["peers"]:
        if r.skipped:
            console.print(f"[yellow]peer {r.name} skipped:[/] {r.skipped}")
        for job, error in r.errors.items():
            console.print(f"[red]peer {r.name}, job {job} failed:[/] {error}")


def _fmt(value: float | None, count: bool = False) -> str:
    if value is None:
        return "-"
    if count:
        return f"{value:,.0f}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


async def _run(
    quick: bool, chosen: set[str] | None, peers: bool, progress: Any
) -> tuple[list[Result], dict[str, Any] | None]:
    results = await run_all(quick, chosen, progress=progress)
    peer_out = None
    if peers:
        from bench.peers import run_peers

        by_id = {r.id: r for r in results}
        peer_out = await run_peers(quick, by_id, progress=progress)
    return results, peer_out


def main(quick: bool, as_json: bool, only: str | None, peers: bool = False) -> int:
    console = Console(stderr=as_json)
    chosen = {o.strip().upper() for o in only.split(",")} if only else None
    started = time.monotonic()
    with console.status("benchmarking") as status:
        results, peer_out = asyncio.run(
            _run(quick, chosen, peers, lambda key: status.update(f"benchmarking {key}"))
        )
    elapsed = time.monotonic() - started
    if as_json:
        out: dict[str, Any] = {r.id: r.as_json() for r in results}
        if peer_out is not None:
            from bench.peers import as_json as peers_json

            out["peers"] = peers_json(peer_out)
        out["_run"] = {"quick": quick, "seconds": round(elapsed, 1), "peers": peers, **_machine()}
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        render(results, elapsed, console)
        if peer_out is not None:
            render_peers(peer_out, console)
    return 0
