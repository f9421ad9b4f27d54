"""Render the dashboard on the demo's data and save docs/dashboard.png.

    CRMFLOW_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python docs/dashboard_screenshot.py

Creates a database of its own on that server (an embedded PostgreSQL when the variable
is unset), runs ``crmflow demo`` on it in a process of its own, serves the API, logs in
with a read key in headless Chromium (Debian's ``/usr/bin/chromium``), takes a full-page
screenshot of /ui, and drops the database.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.main import create_app, serve  # noqa: E402
from engine import apikeys, db  # noqa: E402
from engine.config import Settings  # noqa: E402
from engine.embedded import ensure_database, start_embedded  # noqa: E402

OUT = ROOT / "docs" / "dashboard.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic"]


def server_url() -> str:
    url = os.environ.get("CRMFLOW_DATABASE_URL")
    return url or start_embedded(ROOT / ".crmflow" / "pgdata")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    from playwright.sync_api import sync_playwright

    server = server_url()
    name = f"crmflow_screenshot_{uuid.uuid4().hex[:8]}"
    url = ensure_database(server, name)
    try:
        env = {**os.environ, "CRMFLOW_DATABASE_URL": url}
        subprocess.run(
            [sys.executable, "-m", "engine.cli", "demo"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )

        async def make_key() -> str:
            async with await db.connect(url, autocommit=True) as conn:
                return (await apikeys.create(conn, "screenshot", "read"))[1]

        key = asyncio.run(make_key())
        port = free_port()
        api = serve(create_app(Settings(database_url=url)), "127.0.0.1", port, log_level="warning")
        thread = threading.Thread(target=api.run, daemon=True)
        thread.start()
        while not api.started:
            time.sleep(0.05)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
                )
                page = browser.new_page(viewport={"width": 1360, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/ui/login")
                page.fill("input[name=key]", key)
                page.click("button[type=submit]")
                page.wait_for_url(f"http://127.0.0.1:{port}/ui")
                page.wait_for_selector("text=live updates: connected")
                page.screenshot(path=str(OUT), full_page=True)
                browser.close()
        finally:
            api.should_exit = True
            thread.join(15)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    print(f"{OUT.relative_to(ROOT)}: {OUT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
