"""Regular expressions that PostgreSQL can match in bounded time.

PostgreSQL's engine (Spencer's, a DFA with back-tracking for back-references and sub-match
dissection) has no step limit: a repetition of a group that itself holds a repetition
(``(a+)+``, ``([[:alpha:]]{1,200}\\s?){1,200}``), large counted repetitions
(``x{1,1000}``) and back-references (``(.*)\\1``) can take seconds to minutes on a few
kilobytes. :func:`regex_problem` refuses those; ``?`` and ``{0,1}`` are not repetitions.
"""

from __future__ import annotations

import re

MAX_REGEX_LENGTH = 1000
MAX_REGEX_REPEAT = 100  # {m,n} bounds
MAX_REGEX_REPEATS = 1000  # all the {m,n} bounds of one regex, added up

_BOUND = re.compile(r"\{(\d+)(,(\d*))?\}")
_OPTIONS = re.compile(r"\(\?([a-z]*)\)")
_NESTED = (
    "nested quantifiers (a repeated group that holds a repetition, such as"
    " (a+)+) can make matching take exponential time"
)


def regex_problem(pattern: str) -> str | None:
    """Why PostgreSQL's regex engine could spend unbounded time on ``pattern``, or None.

    The check reads the advanced-regex syntax (ARE) conservatively: it may refuse an odd
    but harmless pattern, never the other way round. Syntax errors are left to
    PostgreSQL (the workflow is checked against it when saved).
    """
    if len(pattern) > MAX_REGEX_LENGTH:
        return f"a regular expression is limited to {MAX_REGEX_LENGTH} characters"
    p = pattern
    if p.startswith("***="):
        return None  # the rest is a literal string
    if p.startswith("***:"):
        p = p[4:]
    options = _OPTIONS.match(p)
    if options:
        if "q" in options[1]:
            return None  # literal
        if "b" in options[1] or "e" in options[1]:
            return "only advanced regular expressions are accepted (no (?b) or (?e))"
        p = p[options.end() :]
    return _Scan(p).problem()


class _Scan:
    """One pass over an ARE, one frame per open group recording whether it holds a
    repetition; ``last`` is the previous atom: None (nothing to repeat), or whether it
    is a group holding a repetition."""

    def __init__(self, p: str) -> None:
        self.p = p
        self.i = 0
        self.stack: list[bool] = [False]
        self.total = 0  # the {m,n} bounds so far
        self.last: bool | None = None

    def problem(self) -> str | None:
        p = self.p
        while self.i < len(p):
            c = p[self.i]
            problem = None
            if c == "\\":
                problem = self._escape()
            elif c == "[":
                self.i = _bracket_end(p, self.i)
                self.last = False
            elif c == "(":
                self._open_group()
            elif c == ")":
                self._close_group()
            elif c in "*+?{":
                problem = self._quantifier(c)
            else:
                self.last = False if c not in "|^$" else None
                self.i += 1
            if problem:
                return problem
        return None

    def _escape(self) -> str | None:
        p, i = self.p, self.i
        d = p[i + 1 : i + 2]
        if d.isdigit() and d != "0":
            return f"back-references (\\{d}) can make matching take exponential time"
        i += 2
        if d in ("x", "u", "U"):
            while i < len(p) and p[i] in "0123456789abcdefABCDEF":
                i += 1
        elif d == "c":
            i += 1
        elif d == "0":
            while i < len(p) and p[i] in "01234567":
                i += 1
        self.i, self.last = i, False
        return None

    def _open_group(self) -> None:
        p = self.p
        self.stack.append(False)
        self.i += 1
        if p.startswith("?", self.i):  # (?: (?= (?! (?<= (?<!
            self.i += 1
            while self.i < len(p) and p[self.i] in ":=!<":
                self.i += 1
        self.last = None

    def _close_group(self) -> None:
        inner = self.stack.pop() if len(self.stack) > 1 else False
        self.stack[-1] = self.stack[-1] or inner
        self.last = inner
        self.i += 1

    def _quantifier(self, c: str) -> str | None:
        p = self.p
        low, high, end = 0, -1, self.i + 1  # high -1: unbounded
        if c == "+":
            low = 1
        elif c == "?":
            high = 1
        elif c == "{":
            bound = _BOUND.match(p, self.i)
            if bound is None:  # not a bound; PostgreSQL says what it is
                self.last = False
                self.i += 1
                return None
            low = int(bound[1])
            high = low if bound[2] is None else (int(bound[3]) if bound[3] else -1)
            end = bound.end()
            if max(low, high) > MAX_REGEX_REPEAT:
                return (
                    f"the repetition {bound[0]} is too large (at most {MAX_REGEX_REPEAT}):"
                    " large repetitions make matching slow"
                )
            self.total += max(low, high)
            if self.total > MAX_REGEX_REPEATS:
                return (
                    f"the repetition counts add up to more than {MAX_REGEX_REPEATS}:"
                    " large repetitions make matching slow"
                )
        if end < len(p) and p[end] == "?":
            end += 1  # non-greedy
        repeats = high == -1 or high > 1
        if repeats and self.last:
            return _NESTED
        if repeats:
            self.stack[-1] = True
        self.last = None
        self.i = end
        return None


def _bracket_end(p: str, i: int) -> int:
    """The index after the bracket expression that starts at ``p[i] == '['``."""
    j = i + 1
    if p.startswith("^", j):
        j += 1
    if p.startswith("]", j):
        j += 1
    while j < len(p) and p[j] != "]":
        if p[j] == "[" and p[j + 1 : j + 2] in (":", ".", "="):
            close = p.find(p[j + 1] + "]", j + 2)
            j = len(p) if close < 0 else close + 2
            continue
        j += 2 if p[j] == "\\" else 1
    return j + 1
