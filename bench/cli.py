"""``crmflow bench [--quick] [--json] [--only P3,P4]``: a table (or JSON) of P1-P6."""

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


def render(results: list[Result], seconds: float, console: Console) -> None:
    table = Table(title=f"crmflow bench ({seconds:.0f} s)", title_justify="left")
    for column in ("id", "what", "target", "measured", ""):
        table.add_column(column)
    for r in results:
        sign = "≥" if r.higher_is_better else "≤"
        measured = f"{r.value:,.2f} {r.unit}"
        if "p99_ms" in r.detail:
            measured += f" (p99 {r.detail['p99_ms']} ms)"
        verdict = "[green]pass[/]" if r.passed else "[red]miss[/]"
        if "p99_pass" in r.detail and not r.detail["p99_pass"]:
            verdict = "[red]miss (p99)[/]"
        if "lost_pass" in r.detail and not r.detail["lost_pass"]:
            verdict = "[red]miss (events lost)[/]"
        table.add_row(r.id, r.what, f"{sign} {r.target:g} {r.unit}", measured, verdict)
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
