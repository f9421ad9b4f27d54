"""`crmflow apikey create/list/revoke` and `crmflow api`, as a new user runs them: a key
from the command line, the server under uvicorn, the seed's endpoints over real HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engine.cli import main
from engine.config import get_settings
from tests.helpers import SEED_QUALIFY


@pytest.fixture
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    monkeypatch.setenv("CRMFLOW_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield {**os.environ, "CRMFLOW_DATABASE_URL": db_url}
    get_settings.cache_clear()


def test_apikey_commands(cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apikey", "create", "--name", "ops", "--scope", "admin"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("cf_") and len(key.splitlines()) == 1  # the key alone on stdout
    assert "shown this once" in err

    assert main(["apikey", "create", "--name", "bi", "--scope", "read", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["scope"] == "read" and created["key"].startswith(f"cf_{created['prefix']}_")

    assert main(["apikey", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["scope"]) for k in listed] == [("ops", "admin"), ("bi", "read")]
    assert key not in json.dumps(listed) and "hash" not in listed[0]

    assert main(["apikey", "revoke", str(created["id"])]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["apikey", "list", "--live", "--json"]) == 0
    assert [k["name"] for k in json.loads(capsys.readouterr().out)] == ["ops"]
    assert main(["apikey", "list"]) == 0
    assert "bi" in capsys.readouterr().out

    assert main(["apikey", "revoke", "999"]) == 1
    assert "no API key 999" in capsys.readouterr().err
    assert main(["apikey", "create", "--name", " ", "--scope", "read"]) == 1
    with pytest.raises(SystemExit):
        main(["apikey", "create", "--name", "x", "--scope", "root"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def crmflow(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_crmflow_api_serves_the_seed_endpoints(cli_env: dict[str, str], db_url: str) -> None:
    crmflow(cli_env, "watch", "leads")
    key = crmflow(cli_env, "apikey", "create", "--name", "me", "--scope", "write").strip()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "api", "--port", str(port)],
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)

        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
            assert http.get("/workflows", headers={"Authorization": ""}).status_code == 401
            response = http.post("/workflows", json=SEED_QUALIFY)
            assert response.status_code == 201, response.text
            wf_id = response.json()["id"]
            workflows: list[dict[str, Any]] = http.get("/workflows").json()
            assert workflows[0]["id"] == wf_id and workflows[0]["execution_count"] == 0
            assert http.put(f"/workflows/{wf_id}/pause").json()["status"] == "paused"
            assert http.put(f"/workflows/{wf_id}/activate").json()["status"] == "active"
            response = http.get(f"/workflows/{wf_id}/executions", params={"limit": 10})
            assert response.status_code == 200 and response.json() == []
    finally:
        server.terminate()
        server.wait(timeout=15)
