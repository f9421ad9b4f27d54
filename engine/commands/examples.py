"""`crmflow seed`, `demo`, `bench`: the example CRM, the one-command demo and the benchmark."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import psycopg

from engine.commands.common import (
    console,
    with_conn,
)


def cmd_seed(args: argparse.Namespace) -> int:
    from engine.seed import seed

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        seeded = await seed(conn)
        for r in seeded.workflows:
            console.print(
                f"workflow {r.id} [bold]{r.name}[/] v{r.version} ({r.status})", highlight=False
            )
        if seeded.users:
            console.print(
                f"added {len(seeded.users)} example users (for the workflows to assign"
                " and notify):",
                highlight=False,
            )
            for u in seeded.users:
                console.print(
                    f"  user {u['id']} {u['name']} ({u['role']})", highlight=False, markup=False
                )
        else:
            console.print("users: the users table has users; no example users added")
        for role in seeded.missing_roles:
            console.print(
                f"warning: no active user has the role {role!r}: the pre-configured"
                f" workflows that assign or notify a {role} will skip or fail; add one with"
                f" INSERT INTO users (name, email, role) VALUES ('...', '...', '{role}')",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        return 0

    return asyncio.run(with_conn(run))


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import run_demo

    return asyncio.run(run_demo(wait_delayed=args.wait))


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.cli import main as bench_main

    return bench_main(quick=args.quick, as_json=args.json, only=args.only, peers=args.peers)


def register(sub: Any) -> None:
    """Add these commands to the top-level subparsers."""
    p = sub.add_parser("seed", help="create the example CRM and install the seed workflows")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("demo", help="everything in one command, on an embedded PostgreSQL")
    p.add_argument(
        "--wait",
        action="store_true",
        help="also wait for the delayed steps (enrich_lead runs 60 s later)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="the benchmark suite (docs/design.md, Targets)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", help="comma-separated ids, e.g. P3,Q1")
    p.add_argument(
        "--peers",
        action="store_true",
        help="also run the same jobs on procrastinate, pgqueuer and graphile-worker "
        "(those that can be installed) and print crmflow ÷ peer",
    )
    p.set_defaults(func=cmd_bench)
