"""The docs say what the tree has: the HTTP API exists (the custom-event example of
docs/workflows.md posts through it, and its calls work as written), and every count
of the pre-configured workflows matches examples/workflows/."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import psycopg

from tests.helpers import apply, value
from tests.paths import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NUMBERS = {
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
COUNT_RE = re.compile(
    rf"\b({'|'.join(NUMBERS)}|\d+)\s+(?:pre-configured workflows|files of\s+`examples/workflows/`)",
    re.IGNORECASE,
)


def test_no_doc_says_there_is_no_http_api() -> None:
    for path in DOCS:
        text = " ".join(path.read_text(encoding="utf-8").split())
        assert not re.search(r"no HTTP API", text, re.IGNORECASE), path.name


def test_pre_configured_workflow_counts() -> None:
    files = len(list((REPO / "examples" / "workflows").glob("*.json")))
    counts = []
    for path in DOCS:
        text = " ".join(path.read_text(encoding="utf-8").split())
        for match in COUNT_RE.finditer(text):
            word = match.group(1).lower()
            counts.append((path.name, int(word) if word.isdigit() else NUMBERS[word]))
    assert len(counts) >= 3, counts  # README, operations.md, workflows.md
    assert all(n == files for _, n in counts), (files, counts)


def event_section() -> str:
    text = (REPO / "docs" / "workflows.md").read_text(encoding="utf-8")
    start = text.index('{"name": "Demo requested"')
    return text[start : text.index("## 3. Conditions", start)]


async def test_the_custom_event_example_posts_through_the_api(
    crm: psycopg.AsyncConnection[Any], client: httpx.AsyncClient
) -> None:
    section = event_section()
    definition = json.loads(section[: section.index("```")])
    await apply(crm, definition)
    await crm.execute("INSERT INTO leads (id, name) VALUES (2, 'Lead two')")
    calls = re.findall(r"-d '(\{.*?\})'\s*\\\s*\n\s*localhost:8000(/events/\S+)", section)
    assert len(calls) == 2, section
    for body, path in calls:
        response = await client.post(path, json=json.loads(body))
        assert response.status_code == 202, response.text
    events = await value(
        crm,
        "SELECT count(*) FROM crmflow.outbox WHERE op = 'event' AND event_name = 'demo_requested'",
    )
    assert events == 2
