"""Settings, read from the environment (prefix ``CRMFLOW_``) and an optional ``.env`` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.durations import parse_duration


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRMFLOW_", env_file=".env", extra="ignore")

    # A libpq URL. Unset: `crmflow demo` and the tests start an embedded PostgreSQL.
    database_url: str | None = None
    # Where the embedded PostgreSQL keeps its data when no database_url is set.
    embedded_data_dir: Path = Path(".crmflow/pgdata")
    # procrastinate's tables and functions live in their own schema, out of the CRM's way.
    procrastinate_schema: str = "procrastinate"
    queue_name: str = "crmflow"
    pool_min_size: int = 1
    pool_max_size: int = 10
    # Session bounds of every engine connection (seconds; 0 turns one off), so that no
    # engine session holds a lock that stops the others for long: a statement, a wait
    # for a lock, a transaction left open by a frozen process (the server ends it).
    statement_timeout: float = Field(30.0, ge=0)
    lock_timeout: float = Field(2.0, ge=0)
    idle_in_transaction_timeout: float = Field(5.0, ge=0)
    # libpq connect_timeout: an unreachable server fails a connection attempt this fast.
    connect_timeout: int = Field(5, ge=0)

    # Matcher: events claimed per transaction, and the poll that backs up LISTEN/NOTIFY.
    matcher_batch_size: int = Field(500, ge=1, le=10_000)
    matcher_poll_interval: float = Field(0.5, gt=0)
    # Bounds per match batch: statement timeout of its statements (s, 0: none; a batch
    # that times out is matched event by event, a slow event recorded as an error), and
    # the captured rows' total size (new_row + old_row; a batch always takes one event).
    matcher_statement_timeout: float = Field(10.0, ge=0)
    matcher_batch_bytes: int = Field(16_000_000, ge=1)
    # Loop protection: writes made by actions carry the execution's depth + 1;
    # an event at this depth or deeper ends the chain with a recorded error.
    max_depth: int = Field(5, ge=1)
    # Run leading immediate database steps in the matcher's transaction (engine/inline.py).
    inline_steps: bool = True
    # The environment this process runs in: a workflow enrolls only on the workers (and
    # manual runs only in the CLI/API processes) of its "environment" ("production" when
    # the workflow does not say). See docs/operations.md, "Environments".
    environment: str = Field("production", pattern=r"^[A-Za-z0-9_-]{1,50}$")

    # Runtime (see docs/operations.md).
    stalled_worker_timeout: float = Field(30.0, gt=0)
    heartbeat_interval: float = Field(5.0, gt=0)
    default_step_timeout: float = Field(300.0, gt=0)
    # The step executor (engine/executor/): executions claimed per batch, how long a
    # claim is leased (renewed while it runs; a dead worker's work is claimable again
    # once it runs out), external calls in flight per process and per target host.
    executor_batch_size: int = Field(200, ge=1, le=5000)
    executor_lease: float = Field(30.0, gt=1)
    executor_concurrency: int = Field(64, ge=1, le=1000)
    executor_host_concurrency: int = Field(16, ge=1, le=1000)  # of those, per target host

    # Actions: outgoing email.
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_use_tls: bool = False
    smtp_start_tls: bool = False
    smtp_timeout: float = 10.0
    email_from: str = "crmflow@localhost"

    # Actions: outgoing HTTP. Hosts that http_request may reach; empty list = any public
    # host. Private, loopback and link-local addresses are refused unless listed here.
    http_allowed_hosts: list[str] = []
    http_allow_private: bool = False
    webhook_secret: SecretStr | None = None
    http_timeout: float = 10.0

    # Circuit breakers of the external actions, per target host (engine/breakers.py):
    # this many consecutive failures (connection errors, timeouts, 5xx, 429) seen by one
    # process open the host's breaker (0: no breakers); its steps then wait, without
    # using an attempt, for breaker_open_seconds, after which one half-open probe call
    # goes. Success closes it; failure opens it again for twice as long, at most
    # breaker_max_open_seconds. A probe that has not reported after
    # breaker_probe_timeout seconds (its process died) lets another process probe.
    breaker_failures: int = Field(5, ge=0)
    breaker_open_seconds: float = Field(30.0, gt=0)
    breaker_max_open_seconds: float = Field(600.0, gt=0)
    breaker_probe_timeout: float = Field(10.0, gt=0)

    # enrich_lead: the enrichment endpoint; unset means the step is skipped.
    enrichment_url: str | None = None
    enrichment_token: SecretStr | None = None

    # Action plugins without packaging: modules (dotted paths) whose ACTION (or ACTIONS)
    # join the registry, besides the "crmflow.actions" entry points.
    plugins: list[str] = []

    # The example CRM's schema, used by the built-in CRM actions (tasks, notifications...).
    crm_schema: str = "public"

    # API
    api_max_body_bytes: int = 1_000_000
    cors_origins: list[str] = []
    events_hmac_secret: SecretStr | None = None
    # /docs (Swagger UI), served from the package's own copy of its assets (api/docs.py).
    api_docs: bool = True
    # Dashboard sessions (api/routes/ui.py): a login lasts this long ("12h", or seconds).
    ui_session_ttl: float = Field(43200.0, gt=0)

    # Alerts (engine/alerts.py): checked every alert_interval seconds by one worker.
    alert_interval: float = Field(30.0, gt=0)
    alert_window: float = Field(900.0, gt=0)  # failure rate over this many seconds
    alert_failure_rate: float = Field(0.1, ge=0, le=1)
    alert_min_executions: int = Field(10, ge=1)  # finished executions before judging a rate
    alert_outbox_age: float = Field(60.0, gt=0)  # seconds the oldest unmatched event may wait

    # Capture heals itself (engine/capture.py heal): every capture_heal_interval seconds
    # a worker follows renamed tables and keys and captures new partitions. With the DDL
    # event trigger (installed when a superuser runs `crmflow migrate`) that happens in
    # the DDL's own transaction and this is only the safety net.
    capture_heal_interval: float = Field(5.0, gt=0)

    # Scheduler: smallest allowed interval between two cron fires, in seconds.
    min_schedule_interval: int = Field(60, ge=1)

    # Retention (engine/retention.py), applied by one worker every retention_interval
    # seconds: processed outbox events older than retention_outbox, finished executions
    # (with their steps) and finished jobs older than retention_history. Durations
    # ("30d", "12h", or seconds); None keeps them forever.
    retention_outbox: float | None = None
    retention_history: float | None = None
    retention_interval: float = Field(60.0, gt=0)
    retention_batch_size: int = Field(1000, ge=1, le=100_000)

    @field_validator("retention_outbox", "retention_history", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if value is None or value == "":
            return None
        return parse_duration(value)

    @field_validator("ui_session_ttl", mode="before")
    @classmethod
    def _session_ttl(cls, value: object) -> object:
        return parse_duration(value)


@lru_cache
def get_settings() -> Settings:
    return Settings()
