"""`crmflow churn generate`: the churn scenario's example history (engine/churn_history.py)."""

from __future__ import annotations

import argparse
import asyncio
from datetime import date
from typing import Any

import psycopg

from engine.commands.common import console, with_conn


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accounts", type=int, default=3000, help="how many accounts (3000)")
    p.add_argument("--seed", type=int, default=17, help="random seed (17)")
    p.add_argument(
        "--end", type=date.fromisoformat, help="last day of the history, YYYY-MM-DD (today)"
    )


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("churn", help="the churn scenario's example data")
    sub = group.add_subparsers(dest="churn_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "generate",
        help="fill the example CRM with two years of customer history (seeded, reproducible)",
    )
    _add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import churn_history, seed
    from engine.config import get_settings

    settings = get_settings()

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        await seed.install_example_crm(conn, settings)
        done = await churn_history.generate(
            conn, args.accounts, args.seed, args.end, settings.crm_schema
        )
        rows = ", ".join(f"{v:,} {k}" for k, v in done.counts.items())
        console.print(
            f"generated {rows} in {done.seconds:.1f} s (history up to {done.end})",
            highlight=False,
        )
        return 0

    return asyncio.run(with_conn(run))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.churn_history")
    _add_generate_arguments(parser)
    return cmd_generate(parser.parse_args(argv))
