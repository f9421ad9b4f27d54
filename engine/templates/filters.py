"""The filters and str methods that can widen their input, each bounded before it does
the work (sizes through :mod:`engine.templates.budget`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jinja2 import (
    filters,
    pass_environment,
    pass_eval_context,
)
from jinja2.exceptions import SecurityError

from engine.templates.budget import (
    MAX_RANGE,
    _bounded,
    _check_percent_format,
    _metered,
    _sized,
    _take_chars,
)


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
