"""qualify_lead: a rules-based lead score, written on the lead with its status.

The default qualifier adds points for the lead's source, a company name, a business
(non-webmail) email address, a senior title and company size, each weight
configurable per step. At ``threshold`` points or more the lead is qualified. A
plugin registering the name ``qualify_lead`` (say, an AI qualifier) replaces it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.actions.base import Action, Params
from engine.executor.context import StepContext
from engine.model import Issue

FREE_MAIL = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "yahoo.com",
        "hotmail.com",
        "outlook.com",
        "live.com",
        "aol.com",
        "icloud.com",
        "me.com",
        "gmx.com",
        "gmx.de",
        "web.de",
        "proton.me",
        "protonmail.com",
        "mail.com",
        "yandex.com",
    }
)
SENIOR = (
    "chief",
    "ceo",
    "cto",
    "cfo",
    "coo",
    "cmo",
    "founder",
    "owner",
    "president",
    "vp",
    "vice president",
    "director",
    "head of",
    "partner",
)
# Whole words only: "coo" is not in "Coordinator", nor "cto" in "Contractor".
SENIOR_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in SENIOR) + r")\b", re.IGNORECASE)


class Weights(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: dict[str, int] = Field(
        default_factory=lambda: {
            "referral": 30,
            "website_form": 25,
            "partner": 25,
            "event": 15,
            "webinar": 15,
            "cold_call": 5,
            "purchased_list": 0,
        }
    )
    company: int = 15
    business_email: int = 20
    senior_title: int = 20
    employees_over_50: int = 10


class QualifyLeadParams(Params):
    threshold: int = 50
    weights: Weights = Field(default_factory=Weights)
    score_field: str = "score"
    status_field: str = "status"
    qualified_status: str = "qualified"
    unqualified_status: str = "nurture"


def score_lead(row: dict[str, Any], weights: Weights) -> tuple[int, list[str]]:
    score, reasons = 0, []
    source = str(row.get("source") or "")
    if weights.source.get(source):
        score += weights.source[source]
        reasons.append(f"source {source} +{weights.source[source]}")
    if str(row.get("company") or "").strip():
        score += weights.company
        reasons.append(f"company +{weights.company}")
    email = str(row.get("email") or "")
    domain = email.rpartition("@")[2].lower()
    if "@" in email and domain and domain not in FREE_MAIL:
        score += weights.business_email
        reasons.append(f"business email +{weights.business_email}")
    title = str(row.get("title") or "")
    if SENIOR_RE.search(title):
        score += weights.senior_title
        reasons.append(f"senior title +{weights.senior_title}")
    employees = row.get("employees")
    if isinstance(employees, int | float) and employees > 50:
        score += weights.employees_over_50
        reasons.append(f"over 50 employees +{weights.employees_over_50}")
    return min(score, 100), reasons


class QualifyLead(Action):
    name = "qualify_lead"
    Params = QualifyLeadParams
    inline = True
    compensable = True
    needs_entity = True
    description = "Score a lead with weighted rules; write its score and qualification status."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        return [
            Issue(f"{path}.{key}", f"{entity.entity_type} has no column {getattr(params, key)!r}")
            for key in ("score_field", "status_field")
            if getattr(params, key) not in entity.columns
        ]

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        row = await ctx.lock_entity_row() or {}
        score, reasons = score_lead(row, params.weights)
        qualified = score >= params.threshold
        status = params.qualified_status if qualified else params.unqualified_status
        old = await ctx.update_entity({params.score_field: score, params.status_field: status})
        return {
            "score": score,
            "qualified": qualified,
            "status": status,
            "reasons": reasons,
            "old": old,
        }

    async def compensate(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> None:
        await ctx.update_entity(result["old"])


ACTION = QualifyLead()
