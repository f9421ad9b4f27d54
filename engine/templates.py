"""Templates in action parameters (``"Follow up on {{ deal.name }}"``), sandboxed.

Jinja2's ImmutableSandboxedEnvironment refuses attribute access to internals
(``__class__``, ``__globals__``...), method calls that mutate, and unsafe callables;
so a template written by a workflow author cannot reach Python or the process.
Rendering is bounded in output size and in loop range.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_OUTPUT = 100_000
MAX_TEMPLATE = 20_000


class TemplateProblem(ValueError):
    """A template that does not parse, or failed while rendering."""


class _Environment(ImmutableSandboxedEnvironment):
    def call(self, context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if obj is range and args and max(abs(a) for a in args if isinstance(a, int)) > 1000:
            raise SecurityError("range() is limited to 1000 items in templates")
        return super().call(context, obj, *args, **kwargs)


@lru_cache(maxsize=1)
def environment() -> _Environment:
    env = _Environment(undefined=StrictUndefined, autoescape=False)
    return env


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def check(text: str) -> None:
    """Raise :class:`TemplateProblem` when ``text`` is not a valid template."""
    if len(text) > MAX_TEMPLATE:
        raise TemplateProblem(f"templates are limited to {MAX_TEMPLATE} characters")
    try:
        tree = environment().parse(text)
    except TemplateError as exc:
        raise TemplateProblem(f"template syntax: {exc.message}") from None
    for node in tree.find_all(nodes.Getattr):
        if node.attr.startswith("_"):
            raise TemplateProblem(f"template reaches for the private attribute {node.attr!r}")


@lru_cache(maxsize=1024)
def _compiled(text: str) -> Any:
    return environment().from_string(text)


def render(text: str, context: dict[str, Any]) -> str:
    if not is_template(text):
        return text
    check(text)
    try:
        out = _compiled(text).render(context)
    except SecurityError as exc:
        raise TemplateProblem(f"template refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        raise TemplateProblem(f"template failed: {exc.message or exc}") from None
    if len(out) > MAX_OUTPUT:
        raise TemplateProblem(f"template output exceeds {MAX_OUTPUT} characters")
    return out


def render_value(value: Any, context: dict[str, Any]) -> Any:
    """Render every string inside a JSON-like value (webhook bodies)."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, list):
        return [render_value(v, context) for v in value]
    if isinstance(value, dict):
        return {k: render_value(v, context) for k, v in value.items()}
    return value


def check_value(value: Any) -> None:
    if isinstance(value, str):
        if is_template(value):
            check(value)
    elif isinstance(value, list):
        for v in value:
            check_value(v)
    elif isinstance(value, dict):
        for v in value.values():
            check_value(v)
