"""Real processes for the chaos suite: ``crmflow worker`` and ``crmflow api`` as
subprocesses, a private PostgreSQL cluster to restart, and the figures report."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
# The venv's console script, as an operator runs it.
CRMFLOW = Path(sys.executable).parent / "crmflow"


def postgres_bin() -> Path:
    """Debian's PostgreSQL binaries, else those of the pgserver wheel (the embedded one)."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if debian:
        return debian[-1].parent
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A crmflow subprocess whose output goes to a log file (a pipe nobody reads would
    block it once full)."""

    def __init__(self, args: list[str], env: dict[str, str], log_dir: Path, name: str) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [str(CRMFLOW), *args],
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.popen.pid
        self.peak_rss_kb = 0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def sample_rss(self) -> int:
        """The process's peak resident set so far (VmHWM, kB); kept after it exits."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
        return self.peak_rss_kb

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.sample_rss()
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self._log.close()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not stop in time; the exit code."""
        self.sample_rss()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


def process_env(db_url: str, **settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "CRMFLOW_DATABASE_URL": db_url,
        # tests.plugins (CRMFLOW_PLUGINS, set by conftest) must import in the subprocess.
        "PYTHONPATH": str(REPO),
        "CRMFLOW_STALLED_WORKER_TIMEOUT": "3",
        # a dead or frozen worker's executions are claimable again after 3 s too
        "CRMFLOW_EXECUTOR_LEASE": "3",
        "CRMFLOW_HEARTBEAT_INTERVAL": "0.5",
        "CRMFLOW_MATCHER_POLL_INTERVAL": "0.2",
        **settings,
    }


def start_worker(
    db_url: str, log_dir: Path, name: str = "worker", concurrency: int = 4, **settings: str
) -> Process:
    return Process(
        ["worker", "--concurrency", str(concurrency)],
        process_env(db_url, **settings),
        log_dir,
        name,
    )


def start_api(db_url: str, log_dir: Path, port: int, **settings: str) -> Process:
    return Process(
        ["api", "--host", "127.0.0.1", "--port", str(port)],
        process_env(db_url, **settings),
        log_dir,
        "api",
    )


@contextlib.contextmanager
def processes() -> Iterator[list[Process]]:
    """Processes appended to the list are stopped at the end, whatever happens."""
    started: list[Process] = []
    try:
        yield started
    finally:
        for p in started:
            if not p._log.closed:
                p.stop(timeout=10)


# ───────────────────────────── figures ─────────────────────────────


@dataclass
class Figures:
    scenario: str
    events_captured: int = 0
    executions_completed: int = 0
    duplicated_effects: int = 0
    lost_events: int = 0
    time_to_recover_s: float | None = None
    peak_rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        recover = "-" if self.time_to_recover_s is None else f"{self.time_to_recover_s:.2f}s"
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (
            f"chaos {self.scenario}: events={self.events_captured} "
            f"completed={self.executions_completed} duplicated={self.duplicated_effects} "
            f"lost={self.lost_events} recover={recover} peak_rss={self.peak_rss_mb:.1f}MB"
            + (f" {extra}" if extra else "")
        )


def report(figures: Figures, workers: list[Process]) -> None:
    """Print the one-line report, and append it as JSON to $CRMFLOW_CHAOS_REPORT."""
    # Counts come from SQL sums as Decimal; the report is JSON.
    for name in ("events_captured", "executions_completed", "duplicated_effects", "lost_events"):
        setattr(figures, name, int(getattr(figures, name)))
    figures.peak_rss_mb = round(max((w.sample_rss() for w in workers), default=0) / 1024, 1)
    if figures.time_to_recover_s is not None:
        figures.time_to_recover_s = round(figures.time_to_recover_s, 2)
    print("\n" + figures.line())
    path = os.environ.get("CRMFLOW_CHAOS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(figures)) + "\n")


# ───────────────────────────── a private PostgreSQL ─────────────────────────────


class PrivateCluster:
    """A PostgreSQL cluster of our own, in a temporary directory, that a test may
    restart: the machine's server is shared and must never be restarted."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="crmflow-chaos-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.bin = postgres_bin()
        # initdb refuses to run as root: run the server binaries as postgres then.
        self._as = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run initdb as")
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
            " -c max_connections=100"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.dir / "server.log"), "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(check: Any, timeout: float, interval: float = 0.1) -> float:
    """Poll a synchronous check until true; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - started
