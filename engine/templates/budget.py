"""A render's work budget: every loop, call, filter and operator of a template draws on
it, and the render fails with :class:`TemplateProblem` the moment it is spent (the limits
are the ``MAX_*`` constants; ``engine/templates/__init__.py`` says what each bounds)."""

from __future__ import annotations

import contextvars
import functools
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jinja2.exceptions import SecurityError
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
