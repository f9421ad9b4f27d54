"""Templates in action parameters (``"Follow up on {{ deal.name }}"``), sandboxed.

Jinja2's ImmutableSandboxedEnvironment refuses attribute access to internals
(``__class__``, ``__globals__``...), method calls that mutate, and unsafe callables;
so a template written by a workflow author cannot reach Python or the process.

Templates render synchronously in the worker's event loop, where no timeout can
interrupt them, so a render carries a work budget (:class:`_Budget`) that every piece
of work draws on, and fails with :class:`TemplateProblem` the moment it is spent:

- steps: loop iterations and calls, at most :data:`MAX_STEPS`;
- items: every item a filter reads or produces (``map``, ``select``, ``sort``,
  ``groupby``, ``list``, ``join``, ``sum``... every filter's input and output is
  metered, generators item by item), at most :data:`MAX_ITEMS`;
- characters: every string an operator, a call or a filter reads or builds, at most
  :data:`MAX_CHARS`;
- CPU time: the thread's CPU time, checked as work is drawn, at most
  :data:`MAX_CPU_SECONDS` (for the filters whose work per character is large).

Sizes are bounded before the work is done where they can be: every string or list
built (``*``, ``+``, ``~``, ``%``, the widening filters and string methods) at most
:data:`MAX_OUTPUT` items, integers :data:`MAX_INT_BITS`, ``range()``
:data:`MAX_RANGE` items, a template's output :data:`MAX_OUTPUT` characters (and
all the strings of one JSON value, :func:`render_value`, :data:`MAX_TOTAL_OUTPUT`).
Recursive loops are not available. Errors name the template (its first characters).

The budget and the limits live in ``budget.py``, the bounded filters in ``filters.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, cast

from jinja2 import (
    StrictUndefined,
    TemplateError,
    nodes,
)
from jinja2.compiler import CodeGenerator, Frame, operators
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.templates.budget import (
    _SLOW_FILTERS,
    MAX_OUTPUT,
    MAX_TEMPLATE,
    MAX_TOTAL_OUTPUT,
    TemplateProblem,
    _binop,
    _bounded_iter,
    _bounded_range,
    _Budget,
    _budget,
    _budgeted,
    _budgeted_test,
    _check_brace_format,
    _check_int,
    _scanned,
    _sized,
    _spend,
)
from engine.templates.filters import (
    _GUARDED_FILTERS,
    _check_str_method,
)

__all__ = [
    "TemplateProblem",
    "check",
    "check_value",
    "environment",
    "is_template",
    "render",
    "render_value",
]


class _CodeGenerator(CodeGenerator):
    """Every loop draws on the render's budget; every ``~`` and slice result is sized and
    charged, every operand of a comparison charged for its scan."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        if node.recursive:
            self.fail("recursive loops are not available in templates", node.lineno)
        bounded = nodes.For(
            node.target,
            nodes.Call(
                nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None
            ).set_lineno(node.lineno),
            node.body,
            node.else_,
            node.test,
            node.recursive,
        )
        bounded.set_lineno(node.lineno)
        super().visit_For(bounded, frame)

    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        self.write("(environment.scanned(")
        self.visit(node.expr, frame)
        self.write(")")
        for op in node.ops:
            self.visit(op, frame)
        self.write(")")

    def visit_Operand(self, node: nodes.Operand, frame: Frame) -> None:
        self.write(f" {operators[node.op]} environment.scanned(")
        self.visit(node.expr, frame)
        self.write(")")

    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if not isinstance(node.arg, nodes.Slice):  # slices bypass environment.getitem
            super().visit_Getitem(node, frame)
            return
        self.write("environment.sized(")
        super().visit_Getitem(node, frame)
        self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    bounded_iter = staticmethod(_bounded_iter)
    sized = staticmethod(_sized)
    scanned = staticmethod(_scanned)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # No bytes: their methods (ljust, zfill, center...) would escape the str bounds.
        if attr == "encode":
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _binop(operator, left, right)
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _spend()
        args = _check_str_method(__obj, args)
        result = super().call(__context, __obj, *args, **kwargs)
        _check_int(result)
        return _sized(result)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        _check_brace_format(value.__self__)
        return wrapper


@lru_cache(maxsize=1)
def environment() -> _Environment:
    # A missing value (NULL column) renders as nothing, not as "None".
    env = _Environment(
        undefined=StrictUndefined, autoescape=False, finalize=lambda v: "" if v is None else v
    )
    env.globals.pop("lipsum", None)
    env.globals["range"] = _bounded_range
    env.filters.update(_GUARDED_FILTERS)
    env.filters = {
        name: _budgeted(f, _SLOW_FILTERS.get(name, 1)) for name, f in env.filters.items()
    }
    # jinja2 types its tests as builtins.function, which mypy does not call.
    tests = cast(dict[str, Callable[..., Any]], env.tests)
    env.tests = {name: _budgeted_test(f) for name, f in tests.items()}
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
    for item in tree.find_all(nodes.Getitem):
        key = item.arg
        if isinstance(key, nodes.Const) and isinstance(key.value, str) and key.value[:1] == "_":
            raise TemplateProblem(f"template reaches for the private attribute {key.value!r}")
    for loop in tree.find_all(nodes.For):
        if loop.recursive:
            raise TemplateProblem("recursive loops are not available in templates")
    try:
        _compiled(text)  # unknown filters and tests are found when compiling
    except TemplateError as exc:
        raise TemplateProblem(f"template: {exc.message or exc}") from None


@lru_cache(maxsize=1024)
def _compiled(text: str) -> Any:
    return environment().from_string(text)


@lru_cache(maxsize=1024)
def _checked(text: str) -> None:
    """:func:`check`, remembered for the templates that passed it."""
    check(text)


def _excerpt(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "…")


def render(text: str, context: dict[str, Any]) -> str:
    if not is_template(text):
        return text
    _checked(text)
    budget = _budget.get()
    token = None
    if budget is None:
        budget = _Budget()
        token = _budget.set(budget)
    try:
        size, parts = 0, []
        for part in _compiled(text).generate(context):
            size += len(part)
            if size > MAX_OUTPUT:
                raise TemplateProblem(f"template output exceeds {MAX_OUTPUT} characters")
            budget.output -= len(part)
            if budget.output < 0:
                raise TemplateProblem(
                    f"the rendered strings exceed {MAX_TOTAL_OUTPUT} characters in all"
                )
            parts.append(part)
        return "".join(parts)
    except TemplateProblem as exc:
        raise TemplateProblem(f"{exc} (template {_excerpt(text)})") from None
    except SecurityError as exc:
        raise TemplateProblem(
            f"template refused by the sandbox: {exc} (template {_excerpt(text)})"
        ) from None
    except TemplateError as exc:
        raise TemplateProblem(
            f"template failed: {exc.message or exc} (template {_excerpt(text)})"
        ) from None
    except Exception as exc:  # the template's own doing (1/0, 'a' + 1, int('x'), ...)
        raise TemplateProblem(
            f"template failed: {type(exc).__name__}: {exc} (template {_excerpt(text)})"
        ) from None
    finally:
        if token is not None:
            _budget.reset(token)


def render_value(value: Any, context: dict[str, Any]) -> Any:
    """Render every string inside a JSON-like value (webhook bodies), on one budget."""
    if _budget.get() is not None:
        return _render_value(value, context)
    token = _budget.set(_Budget())
    try:
        return _render_value(value, context)
    finally:
        _budget.reset(token)


def _render_value(value: Any, context: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, list):
        return [_render_value(v, context) for v in value]
    if isinstance(value, dict):
        return {k: _render_value(v, context) for k, v in value.items()}
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
