"""Steps and workflow-level limits: delays, waits, windows, retries, failure handling."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from engine.conditions import Condition
from engine.durations import parse_duration as parse_duration  # engine.model.parse_duration
from engine.model.base import Duration, _Strict
from engine.windows import Window


class RetryPolicy(_Strict):
    max_attempts: int = Field(3, ge=1, le=50)
    backoff: Duration = 1.0  # the first wait; doubles each attempt
    max_backoff: Duration = 3600.0
    jitter: bool = True


class DelayUntil(_Strict):
    """Wait until a date/time field of the entity, shifted by ``offset`` ("-1d")."""

    until: str
    offset: float = 0.0

    @field_validator("offset", mode="before")
    @classmethod
    def _offset(cls, v: Any) -> float:
        return parse_duration(v, allow_negative=True)


class WaitUntil(_Strict):
    """A step that waits (engine/lifecycle.py) until the entity meets ``conditions``, or
    the custom event ``event`` about it arrives, or ``timeout`` passes; then it runs, its
    result saying which (``{"outcome": "met" | "event" | "timed_out"}``)."""

    conditions: Any = None
    event: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    timeout: Duration
    _conditions: Condition | None = PrivateAttr(None)  # parsed by parse_definition

    @model_validator(mode="after")
    def _one_of(self) -> WaitUntil:
        if (self.conditions is None) == (self.event is None):
            raise ValueError("give either 'conditions' or 'event'")
        return self

    @property
    def parsed_conditions(self) -> Condition | None:
        return self._conditions


class Step(BaseModel):
    """One action. Keys other than the step options are the action's parameters."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(pattern=r"^[a-z][a-z0-9_.]{0,99}$")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    delay: Duration | DelayUntil | None = None
    when: Any = None
    retry: RetryPolicy | None = None
    timeout: Duration | None = None
    on_failure: Literal["stop", "continue", "compensate"] = "stop"
    depends_on: list[str] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    # business hours (engine/windows.py): due outside them, the step waits for the next opening
    window: Window | None = None
    # wait for a condition or a custom event first (engine/lifecycle.py)
    wait_until: WaitUntil | None = None
    _when: Condition | None = PrivateAttr(None)  # the parsed ``when`` tree, set by parse_definition

    @model_validator(mode="before")
    @classmethod
    def _wait_timeout(cls, data: Any) -> Any:
        # "timeout" beside "wait_until" is the wait's timeout, not the action's
        if (
            isinstance(data, dict)
            and isinstance(data.get("wait_until"), dict)
            and "timeout" in data
            and "timeout" not in data["wait_until"]
        ):
            data = dict(data)
            data["wait_until"] = {**data["wait_until"], "timeout": data.pop("timeout")}
        return data

    @field_validator("retry", mode="before")
    @classmethod
    def _retry_count(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return {"max_attempts": v}
        return v

    @model_validator(mode="after")
    def _collect_params(self) -> Step:
        extra = dict(self.__pydantic_extra__ or {})
        if extra:
            overlap = set(extra) & set(self.params)
            if overlap:
                raise ValueError(f"{sorted(overlap)} given both inline and in 'params'")
            self.params = {**extra, **self.params}
            self.__pydantic_extra__ = {}
        return self

    @property
    def when_condition(self) -> Condition | None:
        return self._when


class Limits(_Strict):
    max_per_minute: int | None = Field(None, ge=1)
    on_rate_limit: Literal["wait", "drop"] = "wait"
    max_concurrent: int | None = Field(None, ge=1)
    # A template naming what the limits count per ("{{ entity.account_id }}"): at most
    # max_concurrent executions (and max_per_minute starts) per key (engine/executor/flow.py).
    key: str | None = Field(None, min_length=1, max_length=500)
    debounce: Duration | None = None
    reenrollment: Literal["always", "never", "after"] = "always"
    reenroll_after: Duration | None = None

    @field_validator("key")
    @classmethod
    def _key_is_a_template(cls, v: str | None) -> str | None:
        if v is not None:
            from engine import templates  # (templates imports this module's neighbours)

            try:
                templates.check(v)
            except templates.TemplateProblem as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _reenroll(self) -> Limits:
        if self.reenrollment == "after" and not self.reenroll_after:
            raise ValueError("reenrollment 'after' needs reenroll_after (e.g. '30d')")
        return self
