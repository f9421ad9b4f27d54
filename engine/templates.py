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
"""

from __future__ import annotations

import contextvars
import functools
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any, cast

from jinja2 import (
    StrictUndefined,
    TemplateError,
    filters,
    nodes,
    pass_environment,
    pass_eval_context,
)
from jinja2.compiler import CodeGenerator, Frame, operators
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

MAX_OUTPUT = 100_000
MAX_TOTAL_OUTPUT = 1_000_000  # all the strings of one rendered JSON value
MAX_TEMPLATE = 20_000
MAX_RANGE = 1_000
MAX_STEPS = 10_000  # loop iterations plus calls, per render
MAX_ITEMS = 100_000  # items read or produced by filters, per render
MAX_CHARS = 5_000_000  # characters read or built by operators, calls and filters
MAX_CPU_SECONDS = 0.3  # the rendering thread's CPU time, per render
MAX_WIDTH = 1_000  # field widths and precisions in format strings
MAX_INT_BITS = 20_000
_CLOCK_EVERY = 64  # draws between two looks at the CPU clock


class TemplateProblem(ValueError):
    """A template that does not parse, or failed while rendering."""


class _Budget:
    """What one render (or one :func:`render_value`) may still spend."""

    __slots__ = ("chars", "deadline", "items", "output", "steps", "ticks")

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.items = MAX_ITEMS
        self.chars = MAX_CHARS
        self.output = MAX_TOTAL_OUTPUT
        self.deadline = 0.0  # set at the first look at the clock (most renders never look)
        self.ticks = 0

    def tick(self, weight: int) -> None:
        self.ticks += 1
        if weight < 100 and self.ticks % _CLOCK_EVERY:
            return
        now = time.thread_time()
        if not self.deadline:
            # What came before is at most _CLOCK_EVERY small draws or one bounded one.
            self.deadline = now + MAX_CPU_SECONDS
        elif now > self.deadline:
            raise SecurityError(
                f"the template does too much work (over {MAX_CPU_SECONDS} s of CPU time)"
            )


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "crmflow_template_budget", default=None
)


def _spend(steps: int = 1) -> None:
    budget = _budget.get()
    if budget is None:
        return
    budget.steps -= steps
    if budget.steps < 0:
        raise SecurityError(f"the template does too much work (over {MAX_STEPS} steps)")
    budget.tick(steps)


def _take_items(n: int) -> None:
    budget = _budget.get()
    if budget is None:
        return
    budget.items -= n
    if budget.items < 0:
        raise SecurityError(
            f"the template does too much work (over {MAX_ITEMS} items read or built)"
        )
    budget.tick(n)


def _take_chars(n: int) -> None:
    budget = _budget.get()
    if budget is None:
        return
    budget.chars -= n
    if budget.chars < 0:
        raise SecurityError(
            f"the template does too much work (over {MAX_CHARS} characters read or built)"
        )
    budget.tick(n // 100)


def _bounded(size: int, what: str = "value") -> None:
    if size > MAX_OUTPUT:
        raise SecurityError(f"the template builds a {what} over {MAX_OUTPUT} items")


def _sized(value: Any) -> Any:
    """Bound the size of a value just built, and charge the work of building it."""
    if isinstance(value, str | bytes):
        _bounded(len(value))
        _take_chars(len(value))
    elif isinstance(value, list | tuple):
        _bounded(len(value))
        _take_items(len(value))
    return value


def _bounded_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    """A loop's iterable: each iteration is a step."""
    for item in iterable:
        _spend()
        yield item


class _Metered(Iterator[Any]):
    """An iterator whose every item is charged to the render's item budget."""

    __slots__ = ("_it",)

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._it = iter(iterable)

    def __next__(self) -> Any:
        item = next(self._it)
        _take_items(1)
        return item


def _metered(value: Any, weight: int = 1) -> Any:
    """A filter's input: charge what the filter will read (lazily for generators)."""
    if isinstance(value, str):
        _take_chars(len(value) * weight)
    elif isinstance(value, list | tuple | dict | set | frozenset | range):
        _take_items(len(value))
    elif isinstance(value, Iterator) and not isinstance(value, _Metered):
        return _Metered(value)
    return value


def _measured(value: Any) -> Any:
    """A filter's output: bound it and charge it (lazily for generators)."""
    if isinstance(value, Iterator) and not isinstance(value, _Metered):
        return _Metered(value)
    return _sized(value)


# Filters that walk their text in Python (not in C), at many times the cost per
# character of upper() or replace(): their input counts that many times.
_SLOW_FILTERS = {
    "urlize": 100,
    "wordwrap": 20,
    "title": 20,
    "striptags": 20,
    "wordcount": 20,
    "pprint": 20,
    "urlencode": 20,
    "xmlattr": 20,
    "truncate": 5,
    "indent": 5,
    "capitalize": 5,
    "tojson": 5,
    "format": 5,
}


def _scanned(value: Any) -> Any:
    """An operand of a comparison or a test (``in``, ``==``): charge its scan."""
    if isinstance(value, str):
        _take_chars(len(value))
    elif isinstance(value, list | tuple):
        _take_items(len(value))
    return value


def _budgeted_test(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a test (``select('in', s)`` runs one per item) so its operands are charged."""
    skip = 0 if _PassArg.from_obj(func) is None else 1

    @functools.wraps(func)
    def test(*args: Any, **kwargs: Any) -> Any:
        for arg in args[skip:]:
            _scanned(arg)
        _take_items(1)
        return func(*args, **kwargs)

    return test


def _budgeted(func: Callable[..., Any], weight: int = 1) -> Callable[..., Any]:
    """Wrap a filter so that its input and output are charged to the budget."""
    skip = 0 if _PassArg.from_obj(func) is None else 1  # context/environment first

    @functools.wraps(func)  # keeps jinja_pass_arg
    def filter_(*args: Any, **kwargs: Any) -> Any:
        if len(args) > skip:
            args = (*args[:skip], _metered(args[skip], weight), *args[skip + 1 :])
        return _measured(func(*args, **kwargs))

    return filter_


def _bounded_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() is limited to {MAX_RANGE} items in templates")
    return rng


_PERCENT_SPEC = re.compile(
    r"%(?:\([^)]*\))?[#0\- +]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d+))?[hlL]?[A-Za-z%]"
)


def _check_percent_format(text: str) -> None:
    for match in _PERCENT_SPEC.finditer(text):
        for part in (match["width"], match["precision"]):
            if part == "*" or (part and int(part) > MAX_WIDTH):
                raise SecurityError(f"format widths above {MAX_WIDTH} are not allowed")


def _check_brace_format(text: str) -> None:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:
        return  # str.format will report it
    for _, _, spec, _ in parsed:
        if not spec:
            continue
        if "{" in spec:
            raise SecurityError("nested format fields are not allowed in templates")
        if any(int(n) > MAX_WIDTH for n in re.findall(r"\d+", spec)):
            raise SecurityError(f"format widths above {MAX_WIDTH} are not allowed")


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise SecurityError("the template builds an integer that is too large")


def _check_int(value: Any) -> None:
    if isinstance(value, int):
        _check_bits(value.bit_length())


def _binop(op: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be too big, before computing it."""
    seqs = (str, bytes, list, tuple)
    if op == "*":
        if isinstance(left, seqs) and isinstance(right, int):
            _bounded(len(left) * right)
        elif isinstance(right, seqs) and isinstance(left, int):
            _bounded(len(right) * left)
        elif isinstance(left, int) and isinstance(right, int):
            _check_bits(left.bit_length() + right.bit_length())
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            _check_bits(abs(left).bit_length() * right)
    elif op == "+":
        if isinstance(left, seqs) and isinstance(right, seqs):
            _bounded(len(left) + len(right))
    elif op == "%" and isinstance(left, str):
        _check_percent_format(left)


# ── filters that can widen their input, bounded ──


def _center(value: Any, width: int = 80) -> str:
    _bounded(int(width))
    return filters.do_center(value, width)


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = str(s)
    added = width if isinstance(width, int) else len(str(width))
    _bounded(len(text) + (text.count("\n") + 1) * max(added, 0))
    return filters.do_indent(s, width, first, blank)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_percent_format(str(value))
    formatted: str = _sized(filters.do_format(value, *args, **kwargs))
    return formatted


@pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    text, old_s, new_s = str(s), str(old), str(new)
    hits = len(text) + 1 if old_s == "" else text.count(old_s)
    if count is not None and count >= 0:
        hits = min(hits, count)
    _bounded(len(text) + hits * max(len(new_s) - len(old_s), 0))
    return filters.do_replace(eval_ctx, s, old, new, count)


@pass_environment
def _wordwrap(
    environment: Any,
    s: Any,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    text = str(s)
    glue = len(wrapstring) if wrapstring is not None else 2
    _bounded(len(text) + (len(text) // max(int(width), 1) + 1) * glue)
    return filters.do_wordwrap(
        environment, s, width, break_long_words, wrapstring, break_on_hyphens
    )


@pass_eval_context
def _join(eval_ctx: Any, value: Any, d: str = "", attribute: str | int | None = None) -> str:
    items = list(_metered(value))
    if attribute is not None:
        getter = filters.make_attrgetter(eval_ctx.environment, attribute)
        items = [getter(item) for item in items]
    _bounded(sum(len(str(item)) for item in items) + len(str(d)) * len(items))
    return filters.sync_do_join(eval_ctx, items, d)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Any:
    if int(slices) > MAX_RANGE:
        raise SecurityError(f"slice() is limited to {MAX_RANGE} slices in templates")
    return filters.sync_do_slice(value, slices, fill_with)


def _batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
    _bounded(int(linecount))
    return filters.do_batch(value, linecount, fill_with)


_GUARDED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _center,
    "indent": _indent,
    "format": _format,
    "replace": _replace,
    "wordwrap": _wordwrap,
    "join": _join,
    "slice": _slice,
    "batch": _batch,
}


def _check_str_method(method: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Bound the str methods that can widen a string; returns the (maybe materialised) args."""
    owner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    if isinstance(owner, bytes | bytearray):
        raise SecurityError("bytes methods are not available in templates")
    if not isinstance(owner, str):
        return args
    _take_chars(len(owner))  # every str method reads its string
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _bounded(args[0])
    elif name == "expandtabs":
        size = args[0] if args and isinstance(args[0], int) else 8
        _bounded(len(owner) + owner.count("\t") * max(size, 0))
    elif name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        hits = len(owner) + 1 if old == "" else owner.count(old)
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            hits = min(hits, args[2])
        _bounded(len(owner) + hits * max(len(new) - len(old), 0))
    elif name == "join" and args:
        items = list(_metered(args[0]))
        _bounded(sum(len(i) if isinstance(i, str) else 0 for i in items) + len(owner) * len(items))
        return (items, *args[1:])
    return args


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
