"""Workflow names cannot make lookalikes: a name is normalised (NFKC), and control and
format characters (zero-width spaces, bidi overrides...) and surrounding whitespace are
refused with an error at ``name`` — through the engine's save functions, the API (POST,
PUT, PATCH) and ``crmflow workflow apply``; a refused name changes nothing. Two names
equal after normalisation are one workflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from engine import workflows
from engine.cli import main
from engine.model import DefinitionError
from tests.workflows.test_bad_input import add_canary, assert_names, cli_db, definition, state

__all__ = ["cli_db"]  # the fixture, imported to be used here

Conn = psycopg.AsyncConnection[Any]

ORIGINAL = "Auto-qualify new leads from website"

BAD_NAMES = [
    pytest.param(ORIGINAL + "\u200b", "U+200B", id="zero-width-space"),
    pytest.param("Auto-qualify\u200dnew leads", "U+200D", id="zero-width-joiner"),
    pytest.param("\u202eetisbew morf sdael wen yfilauq-otuA", "U+202E", id="bidi-override"),
    pytest.param("Auto-qualify new le\u00adads", "U+00AD", id="soft-hyphen"),
    pytest.param("\ufeff" + ORIGINAL, "U+FEFF", id="byte-order-mark"),
    pytest.param(ORIGINAL + "\u2060", "U+2060", id="word-joiner"),
    pytest.param("Auto-qualify\tnew leads", "U+0009", id="tab"),
    pytest.param("Auto-qualify\nnew leads", "U+000A", id="newline"),
    pytest.param("Auto-qualify\x00", "U+0000", id="nul"),
    pytest.param("Auto-qualify\x7f", "U+007F", id="delete"),
    pytest.param("Auto-qualify\u2028new leads", "U+2028", id="line-separator"),
    pytest.param(" " + ORIGINAL, "whitespace", id="leading-space"),
    pytest.param(ORIGINAL + " ", "whitespace", id="trailing-space"),
    pytest.param(ORIGINAL + "\u00a0", "whitespace", id="trailing-nbsp"),
    pytest.param("\u3000" + ORIGINAL, "whitespace", id="leading-ideographic-space"),
    pytest.param("   ", "whitespace", id="only-spaces"),
    pytest.param("\ufdfa" * 12, "200", id="too-long-once-normalised"),
]


@pytest.fixture
async def crm_canary(crm: Conn) -> Conn:
    await add_canary(crm)
    return crm


@pytest.mark.parametrize(("name", "reason"), BAD_NAMES)
async def test_refused_names(
    crm_canary: Conn, client: httpx.AsyncClient, db_url: str, name: str, reason: str
) -> None:
    created = await client.post("/workflows", json=definition(name=ORIGINAL))
    assert created.status_code == 201, created.text
    workflow_id = created.json()["id"]
    before = state(db_url)
    raw = definition(name=name)
    with pytest.raises(DefinitionError) as exc:
        await workflows.apply(crm_canary, raw)
    assert_names(exc.value.as_list(), "name", reason)
    assert [i["path"] for i in exc.value.as_list()] == ["name"]
    for response in (
        await client.post("/workflows", json=raw),
        await client.put(f"/workflows/{workflow_id}", json=raw),
        await client.patch(f"/workflows/{workflow_id}", json={"name": name}),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["errors"] == exc.value.as_list()
    assert state(db_url) == before
    assert (await client.get(f"/workflows/{workflow_id}")).json()["name"] == ORIGINAL


def test_refused_name_in_a_file(
    cli_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(definition(name=ORIGINAL + "\u200b")), encoding="utf-8")
    before = state(cli_db)
    capsys.readouterr()
    assert main(["workflow", "apply", str(bad)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "name" in err and "U+200B" in err, err
    assert state(cli_db) == before


async def test_names_equal_after_normalisation_are_one_workflow(
    crm_canary: Conn, client: httpx.AsyncClient, db_url: str
) -> None:
    first = await workflows.apply(crm_canary, definition(name=ORIGINAL))
    assert first.created
    # Fullwidth letters and a ligature are the same name once NFKC-normalised.
    fullwidth_auto = "\uff21\uff55\uff54\uff4f"  # "Auto" in fullwidth letters
    lookalike = fullwidth_auto + "-quali\ufb01ed"
    fullwidth = fullwidth_auto + "-qualify new leads from website"
    same = await workflows.apply(crm_canary, definition(name=fullwidth, priority=5))
    assert (same.id, same.created, same.name) == (first.id, False, ORIGINAL)
    assert same.new_version
    # The API's create refuses it as taken (409), rather than making a second workflow.
    response = await client.post("/workflows", json=definition(name=fullwidth))
    assert response.status_code == 409, response.text
    assert state(db_url)["workflows"] == 1

    # A name is stored normalised, in the workflow and in its versions' definitions.
    created = await client.post("/workflows", json=definition(name=lookalike))
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "Auto-qualified"
    versions = await client.get(f"/workflows/{created.json()['id']}/versions")
    assert [v["definition"]["name"] for v in versions.json()] == ["Auto-qualified"]
    # Looking a workflow up by name normalises the name given too (the CLI accepts names).
    found = await workflows.find_workflow(crm_canary, fullwidth_auto + "-qualified")
    assert found["id"] == created.json()["id"]
    # Inner spaces, letters of any script and emoji are fine.
    for name in ("Relance des prospects — été", "見込み客の自動判定", "Deals won 🎉", "a  b"):
        assert (await workflows.apply(crm_canary, definition(name=name))).name == name
