"""Hard bounds on the work one event can cause (docs/design.md, "The host comes first").

- Templates: a render is bounded in work (loop iterations and calls, items that pass
  through filters, characters built or scanned) and in CPU time, filters included; a
  template over a bound fails its step at once, permanently, with the reason.
- ``matches`` regexes: nested quantifiers, large repetition counts and
  back-references are refused when the workflow is saved; the regex runs on the first
  :data:`engine.conditions.MAX_REGEX_INPUT` characters of the value.
- ``{"sql": ...}`` conditions: string-growing functions are bounded (constant
  replacements, a growth factor and a nesting depth), regex operators take a constant,
  checked pattern.
"""

from __future__ import annotations

import time
from typing import Any

import jinja2
import psycopg
import pytest

from engine import templates
from engine.conditions import MAX_REGEX_INPUT
from engine.matcher import Matcher
from engine.model import DefinitionError
from engine.runtime import Runner
from engine.sqlexpr import UnsafeExpression, validate_expression
from tests.helpers import apply, drive, execution_ids, steps, value

Conn = psycopg.AsyncConnection[Any]

LEAD_CREATED = {"type": "entity_created", "entity_type": "lead"}
LEAD_UPDATED = {"type": "entity_updated", "entity_type": "lead"}

HOSTILE = (
    "{% set s = ('ab'*49999)|list %}{% for i in range(300) %}"
    "{% set u = s|map('upper')|list %}{% endfor %}"
)


async def new_lead(conn: Conn, **columns: Any) -> int:
    columns = {"name": "Bob Lead", **columns}
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    return await value(
        conn, f"INSERT INTO leads ({names}) VALUES ({marks}) RETURNING id", *columns.values()
    )


def refused(exc: pytest.ExceptionInfo[DefinitionError]) -> dict[str, str]:
    return {i.path: i.message for i in exc.value.issues}


# ───────────────────────────── templates ─────────────────────────────

FILTER_BOMBS = [
    HOSTILE,
    # every filter that walks its input, in a loop over a 100k-item list
    *[
        "{% set s = ('ab'*49999)|list %}{% for i in range(1000) %}{% set u = s|"
        + f
        + " %}{% endfor %}"
        for f in (
            "map('upper')|list",
            "select('equalto', 'a')|list",
            "reject('equalto', 'a')|list",
            "sort",
            "unique|list",
            "groupby(0)",
            "join",
            "batch(3)|list",
            "slice(3)|list",
            "reverse|list",
            "max",
            "min",
            "sum(start='')",
            "tojson",
            "list",
            "map('length')|sum",
            "selectattr('isupper')|list",
        )
    ],
    # string filters and string work in a loop over a 100k-character string
    *[
        "{% set t = 'ab cd <b>x</b> '*6000 %}{% for i in range(1000) %}{% set u = t|"
        + f
        + " %}{% endfor %}"
        for f in (
            "urlize",
            "title",
            "striptags",
            "wordcount",
            "upper",
            "replace('a', 'b')",
            "wordwrap(20)",
            "trim",
            "escape",
            "pprint",
            "list|length",
        )
    ],
    "{% for i in range(1000) %}{% for j in range(10) %}{% set u = 'ab'*49999 %}"
    "{% endfor %}{% endfor %}",
    "{% set t = 'x'*50000 %}{% for i in range(1000) %}{% for j in range(10) %}"
    "{% set u = t ~ t %}{% endfor %}{% endfor %}",
    "{% set t = 'x'*50000 %}{% for i in range(1000) %}{% for j in range(10) %}"
    "{% set u = t + t %}{% endfor %}{% endfor %}",
    "{% set t = 'a b '*25000 %}{% for i in range(1000) %}{% set u = t.split() %}{% endfor %}",
    "{% set t = 'a b '*25000 %}{% for i in range(1000) %}{% set u = t.upper() %}{% endfor %}",
    "{% set t = 'a,'*49999 %}{% for i in range(1000) %}{% set u = t.split(',')|map('upper')"
    "|join %}{% endfor %}",
    # comparisons and tests scan their operands in C, but still count
    "{% set s = ('ab'*49999)|list %}{% for i in range(1000) %}{% for j in range(10) %}"
    "{% if 'z' in s %}{% endif %}{% endfor %}{% endfor %}",
    "{% set t = 'ab'*49999 %}{% for i in range(1000) %}{% for j in range(10) %}"
    "{% if 'zz' in t or t == t %}{% endif %}{% endfor %}{% endfor %}",
    "{% set s = ('a'*30000)|list %}{% set t = ('b'*30000)|list %}"
    "{{ s|select('in', t)|list|length }}",
    "{% set t = 'ab'*49999 %}{% for i in range(1000) %}{% for j in range(10) %}"
    "{% set u = t[::-1] %}{% endfor %}{% endfor %}",
    # bytes would escape the bounds of str
    "{{ ('x'.encode()) * 100000000 }}",
    "{% set b = 'x'.encode() %}{{ b.ljust(1000000000)|length }}",
    # a large output
    "{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}",
]


@pytest.mark.parametrize("template", FILTER_BOMBS)
def test_work_inside_filters_is_bounded(template: str) -> None:
    templates.check(template)  # nothing to see when saving: it fails when rendered
    started = time.perf_counter()
    with pytest.raises(templates.TemplateProblem) as exc:
        templates.render(template, {"entity": {"name": "x"}})
    elapsed = time.perf_counter() - started
    assert elapsed < 0.8, (elapsed, template)
    assert "template" in str(exc.value)


def test_bytes_from_the_context_are_bounded_too() -> None:
    for template in ("{{ b.ljust(1000000000)|length }}", "{{ (b * 1000000000)|length }}"):
        with pytest.raises(templates.TemplateProblem):
            templates.render(template, {"b": b"x"})


def test_the_hostile_template_fails_fast_and_says_why() -> None:
    started = time.perf_counter()
    with pytest.raises(templates.TemplateProblem) as exc:
        templates.render(HOSTILE, {})
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, elapsed
    message = str(exc.value)
    assert "too much work" in message or "too many" in message, message
    assert "{% set s = ('ab'*49999)|list %}" in message  # which template


def test_ordinary_templates_are_unaffected() -> None:
    context = {
        "entity": {
            "name": "Eve",
            "tags": ["b", "a", "c", "a"],
            "notes": "line one\nline two " * 200,
            "deals": [{"name": f"D{i}", "amount": i * 10} for i in range(200)],
        }
    }
    cases = {
        "{{ entity.tags | sort | join(',') }}": "a,a,b,c",
        "{{ entity.tags | unique | list | length }}": "3",
        "{{ entity.tags | map('upper') | select('ne', 'A') | join }}": "BC",
        "{{ entity.deals | sum(attribute='amount') }}": str(sum(i * 10 for i in range(200))),
        "{{ entity.deals | selectattr('amount', 'gt', 1980) | map(attribute='name') | first }}": (
            "D199"
        ),
        "{{ entity.deals | groupby('amount') | length }}": "200",
        "{{ entity.deals | batch(50) | list | length }}": "4",
        "{{ entity.notes | wordcount }}": "800",
        "{{ entity.notes | truncate(12) }}": "line...",
        "{{ entity.notes | truncate(12, true, '', 0) }}": "line one\nlin",
        "{{ entity.name | replace('E', 'A') | title }}": "Ave",
        "{% for d in entity.deals %}{{ d.name }}{% endfor %}": "".join(f"D{i}" for i in range(200)),
    }
    plain = jinja2.Environment()
    for template, expected in cases.items():
        assert plain.from_string(template).render(context) == expected, template
        assert templates.render(template, context) == expected, template
    # a long, ordinary body: 200 lines of an entity's fields
    body = "{% for d in entity.deals %}{{ d.name }}: {{ '%.2f' | format(d.amount) }}\n{% endfor %}"
    assert templates.render(body, context).count("\n") == 200


def test_a_body_of_many_templates_shares_one_budget() -> None:
    heavy = "{% set s = ('ab'*5000)|list %}{{ s|map('upper')|join|length }}"
    assert templates.render(heavy, {}) == "10000"
    started = time.perf_counter()
    with pytest.raises(templates.TemplateProblem):
        templates.render_value({"k": [heavy] * 50}, {})
    assert time.perf_counter() - started < 0.8


async def test_hostile_template_fails_its_step_not_the_worker(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Hostile title",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "create_task", "title": HOSTILE}],
        },
    )
    await new_lead(crm, owner_id=1)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    started = time.perf_counter()
    ex = await drive(runner, crm, execution_id)
    elapsed = time.perf_counter() - started
    [step] = await steps(crm, execution_id)
    assert ex["status"] == "failed"
    assert step["status"] == "failed" and step["attempts"] == 1  # permanent: no retry
    assert "template" in step["error"] and "too m" in step["error"], step["error"]
    assert elapsed < 1.0, elapsed
    assert await value(crm, "SELECT count(*) FROM tasks") == 0


# ───────────────────────────── regexes ─────────────────────────────

BAD_REGEXES = {
    r"^([[:alpha:]]{1,200}\s?){1,200}$": "repetition",
    r"^([[:alpha:]]{1,50}\s?){1,50}$": "nested",
    r"^(a+)+$": "nested",
    r"(x*)*y": "nested",
    r"^((ab)*c)+$": "nested",
    r"(?:\w+\s?)+$": "nested",
    r"a{1,1000}": "repetition",
    r"\d{101}": "repetition",
    r"(.*)\1": "back-reference",
    r"(a)(b)\2": "back-reference",
}

GOOD_REGEXES = [
    r"^\+33",
    r"(?i)^(vp|chief|head)",
    r"^[[:alpha:]]{1,100}\s?[a-z]*$",
    r"^(\+\d+)?[0-9 ]{6,20}$",
    r"^[^@]+@[^@]+\.[a-z]{2,}$",
    r"(ab|cd){2,5}x",
    r"[(+*]\)",
    r"\(a+\)+",
    r"***=(a+)+",
]


@pytest.mark.parametrize(("regex", "why"), BAD_REGEXES.items())
async def test_pathological_regexes_are_refused_at_save(crm: Conn, regex: str, why: str) -> None:
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            {
                "name": "Slow regex",
                "trigger": LEAD_CREATED,
                "conditions": [
                    {"field": "source", "operator": "equals", "value": "web"},
                    {"any": [{"field": "name", "operator": "matches", "value": regex}]},
                ],
                "actions": [{"type": "qualify_lead"}],
            },
        )
    issues = refused(exc)
    assert list(issues) == ["conditions[1].any[0].value"], issues
    assert why in issues["conditions[1].any[0].value"], issues
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0


@pytest.mark.parametrize("regex", GOOD_REGEXES)
async def test_ordinary_regexes_are_accepted(crm: Conn, regex: str) -> None:
    await apply(
        crm,
        {
            "name": "Fine regex",
            "trigger": LEAD_CREATED,
            "conditions": [{"field": "name", "operator": "matches", "value": regex}],
            "actions": [{"type": "qualify_lead"}],
        },
    )


async def test_regexes_in_sql_conditions_are_checked_too(crm: Conn) -> None:
    for expression, why in (
        ("name ~ '^([[:alpha:]]{1,50}\\s?){1,50}$'", "nested"),
        ("name !~* '(a+)+$'", "nested"),
        ("name ~ email", "constant"),
        ("name ~ ANY(ARRAY['a', '(.*)\\1'])", "back-reference"),
        ("regexp_replace(name, '(a*)*', '') = ''", "nested"),
        ("regexp_replace(name, email, '') = ''", "constant"),
    ):
        with pytest.raises(DefinitionError) as exc:
            await apply(
                crm,
                {
                    "name": "Slow sql regex",
                    "trigger": LEAD_CREATED,
                    "conditions": [{"sql": expression}],
                    "actions": [{"type": "qualify_lead"}],
                },
            )
        issues = refused(exc)
        assert list(issues) == ["conditions[0].sql"], (expression, issues)
        assert why in issues["conditions[0].sql"], (expression, issues)
    await apply(
        crm,
        {
            "name": "Fine sql regex",
            "trigger": LEAD_CREATED,
            "conditions": [{"sql": "name ~* '^bob' AND email !~ ANY(ARRAY['x$', '^y'])"}],
            "actions": [{"type": "qualify_lead"}],
        },
    )


async def test_an_invalid_regex_in_sql_is_refused_at_save(crm: Conn) -> None:
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            {
                "name": "Bad sql regex",
                "trigger": LEAD_CREATED,
                "conditions": [{"sql": "name ~ '(unclosed'"}],
                "actions": [{"type": "qualify_lead"}],
            },
        )
    assert "conditions[0].sql" in refused(exc)


async def test_matches_reads_a_bounded_prefix_of_the_value(crm: Conn, matcher: Matcher) -> None:
    """The regex runs on the first MAX_REGEX_INPUT characters: a needle past them is not
    seen, and matching two 40k-character values with the costliest accepted regex is quick."""
    await apply(
        crm,
        {
            "name": "Needle",
            "trigger": LEAD_CREATED,
            "conditions": [{"field": "company", "operator": "matches", "value": "needle"}],
            "actions": [{"type": "qualify_lead"}],
        },
    )
    await apply(
        crm,
        {
            "name": "Heavy but accepted",
            "trigger": LEAD_UPDATED,
            "conditions": [
                {
                    "field": "title",
                    "operator": "matches",
                    "value": r"^[[:alpha:]]{1,100}\s?[[:alpha:]]{1,100}\s?(ab|[[:alpha:]]){2,100}"
                    r"\s?[a-z]{1,100}x$",
                }
            ],
            "actions": [{"type": "qualify_lead"}],
        },
    )
    early = await new_lead(crm, company="x" * 100 + "needle" + "x" * 50_000)
    late = await new_lead(crm, company="x" * MAX_REGEX_INPUT + "needle")
    await matcher.drain()
    pks = await crm.execute("SELECT entity_pk::text AS pk FROM crmflow.executions")
    [row] = await pks.fetchall()  # the early needle only
    assert str(early) in row["pk"] and str(late) not in row["pk"], (row, early, late)

    long_text = "abcdefghij" * 4000
    await crm.execute("UPDATE leads SET title = %s WHERE id IN (%s, %s)", [long_text, early, late])
    started = time.perf_counter()
    await matcher.drain()
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, elapsed


# ───────────────────────────── string-growing SQL ─────────────────────────────

GROWING_SQL = {
    "length(replace(replace(replace(name, 'a', name), 'a', name), 'a', name)) > 0": "constant",
    "length(replace(name, 'a', email)) > 0": "constant",
    "length(" + "replace(" * 5 + "name" + ", 'a', 'aaaa')" * 5 + ") > 0": "times",
    "length(regexp_replace(name, '', 'xxxxxxxxxxxxxxxxxxxxxxxx', 'g')) > 0": "times",
    "length(regexp_replace(name, 'a', email, 'g')) > 0": "constant",
    "length(lpad(name, 100000000)) > 0": "lpad",
    "length(rpad(name, score, 'x')) > 0": "constant",
    "length(lpad(name, 10, email)) > 0": "constant",
    "length(" + " || ".join(["name"] * 40) + ") > 0": "times",
    "length(concat(" + ", ".join(["email"] * 40) + ")) > 0": "times",
    "length(" + "upper(lower(" * 8 + "name" + "))" * 8 + ") > 0": "nest",
    "length(replace('" + "x" * 900 + "', 'x', '" + "y" * 900 + "')) > 0": "characters",
    "length(repeat(name, 3)) > 0": "not allowed",
    "name LIKE '%' || email || '%'": "LIKE patterns must be constant",
    "name NOT ILIKE email": "LIKE patterns must be constant",
    "name ~~ ANY(ARRAY['a%', email])": "LIKE patterns must be constant",
}


@pytest.mark.parametrize(("expression", "why"), GROWING_SQL.items())
async def test_string_growing_sql_is_refused(crm: Conn, expression: str, why: str) -> None:
    with pytest.raises(UnsafeExpression) as unsafe:
        validate_expression(expression)
    assert why in str(unsafe.value), (expression, str(unsafe.value))
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            {
                "name": "Growing",
                "trigger": LEAD_CREATED,
                "conditions": [{"sql": expression}],
                "actions": [{"type": "qualify_lead"}],
            },
        )
    issues = refused(exc)
    assert list(issues) == ["conditions[0].sql"], issues
    assert why in issues["conditions[0].sql"]


ORDINARY_SQL = [
    "replace(replace(replace(coalesce(email, ''), ' ', ''), '-', ''), '.', '') <> ''",
    "regexp_replace(coalesce(email, ''), '[^a-z]', '', 'g') <> ''",
    "regexp_replace(name, '^(\\w+) (\\w+)$', '\\2, \\1') <> ''",
    "lpad(coalesce(score, 0)::text, 5, '0') > '00010'",
    "rpad(name, 20) <> ''",
    "concat(name, ' <', email, '>') <> '' AND name || ' ' || coalesce(company, '') <> ''",
    "concat_ws(', ', name, email, company, title, source) <> ''",
    "upper(trim(name)) = 'BOB LEAD' OR lower(left(name, 3)) = 'bob'",
    "replace(name, ' ', ', ') <> ''",
    "to_char(created_at, 'YYYY-MM-DD') <> ''",
    "lower(email) LIKE '%.test' AND name NOT ILIKE ANY(ARRAY['x%', '%y'])",
    "substring(name from 1 for 3) = 'Bob' AND substring(name, strpos(name, ' ') + 1) <> ''",
    "substring(name from '^B(o)') = 'o'",
]


async def test_ordinary_string_sql_is_accepted_and_runs(crm: Conn, matcher: Matcher) -> None:
    for i, expression in enumerate(ORDINARY_SQL):
        await apply(
            crm,
            {
                "name": f"Ordinary {i}",
                "trigger": LEAD_CREATED,
                "conditions": [{"sql": expression}],
                "actions": [{"type": "qualify_lead"}],
            },
        )
    await new_lead(crm, email="bob@acme.test", score=20, company="Acme", title="CEO")
    await matcher.drain()
    assert await value(crm, "SELECT count(*) FROM crmflow.executions") == len(ORDINARY_SQL)
