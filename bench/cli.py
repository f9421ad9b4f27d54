"""``crmflow bench [--quick] [--json] [--only P3,Q1] [--peers]``: a table (or JSON) of the
targets, and with ``--peers`` the same jobs on the peers (bench/peers.py)."""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time

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


def main(quick: bool, as_json: bool, only: str | None) -> int:
    console = Console(stderr=as_json)
    chosen = {o.strip().upper() for o in only.split(",")} if only else None
    started = time.monotonic()
    with console.status("benchmarking") as status:
        results = asyncio.run(
            run_all(quick, chosen, progress=lambda key: status.update(f"benchmarking {key}"))
        )
    elapsed = time.monotonic() - started
    if as_json:
        out = {r.id: r.as_json() for r in results}
        out["_run"] = {"quick": quick, "seconds": round(elapsed, 1), **_machine()}
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        render(results, elapsed, console)
    return 0
