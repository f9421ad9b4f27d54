"""A scorecard loop step run in a process of its own, for the tests that kill it
(SIGKILL) in the middle: ``python -c SCRIPT URL rescore_queued|run_due``. It prints its
backend's pid, then runs the step once."""

SCRIPT = """
import asyncio, sys
from engine import db
from engine.scorecards import run

async def main() -> None:
    conn = await db.connect(sys.argv[1], autocommit=True)
    print(conn.info.backend_pid, flush=True)
    await getattr(run, sys.argv[2])(conn)

asyncio.run(main())
"""
