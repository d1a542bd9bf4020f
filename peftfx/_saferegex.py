"""Regular expressions that cannot hang: a linear-time matcher for the regexes users put in selectors.

Python's ``re`` backtracks, so a pattern such as ``([a-z_.0-9]+)+X`` takes exponential time on a site key that
does not match, and Python 3.11 has no timeout. peftfx therefore never runs a user's regex through ``re``'s
matcher: :class:`SafeRegex` parses the pattern with Python's own parser (so the syntax is exactly ``re``'s) and
compiles it to a Thompson NFA that is simulated breadth-first (Pike/RE2 style) — every character of the input is
looked at once, whatever the pattern, so matching takes O(len(text) · len(program)) and is cached into a DFA as it
runs. Patterns are bounded (:data:`MAX_PATTERN` characters, :data:`MAX_PROGRAM` instructions once counted repeats
are expanded). Constructs that need backtracking — backreferences, lookaround, conditional groups, atomic groups
and possessive quantifiers — are refused with a :class:`~peftfx.RuleError`; nothing in a module-name selector
needs them. Only whole-string matching (``re.fullmatch``) is offered: that is what selectors mean.
"""
from __future__ import annotations

import re
from typing import Callable

from ._errors import RuleError

try:                                   # Python ≥ 3.11
    import re._constants as C
    import re._parser as P
except ImportError:                    # pragma: no cover - Python 3.10
    import sre_constants as C          # type: ignore[no-redef]
    import sre_parse as P              # type: ignore[no-redef]

__all__ = ["SafeRegex", "compile_safe", "MAX_PATTERN", "MAX_PROGRAM"]

MAX_PATTERN = 1000          # characters in a pattern
MAX_PROGRAM = 10_000        # NFA instructions after expanding counted repeats ({m,n})
_CACHE_LIMIT = 50_000       # DFA cache entries kept per pattern before it is cleared

_CHAR, _SPLIT, _JMP, _ASSERT, _MATCH = range(5)
_UNSUPPORTED = {"GROUPREF": "backreferences (\\1)", "GROUPREF_EXISTS": "conditional groups (?(1)…)",
                "ASSERT": "lookahead/lookbehind (?=…)", "ASSERT_NOT": "negative lookaround (?!…)",
                "ATOMIC_GROUP": "atomic groups (?>…)", "POSSESSIVE_REPEAT": "possessive quantifiers (a++)"}


def _word(ch: str | None, ascii_only: bool) -> bool:
    return ch is not None and (ch.isalnum() or ch == "_") and (not ascii_only or ch.isascii())


def _category(cat, ascii_only: bool) -> Callable[[str], bool]:
    a = ascii_only
    table = {
        C.CATEGORY_DIGIT: lambda c: c.isdecimal() and (not a or c.isascii()),
        C.CATEGORY_SPACE: lambda c: c.isspace() and (not a or c.isascii()),
        C.CATEGORY_WORD: lambda c: _word(c, a),
    }
    negated = {C.CATEGORY_NOT_DIGIT: C.CATEGORY_DIGIT, C.CATEGORY_NOT_SPACE: C.CATEGORY_SPACE,
               C.CATEGORY_NOT_WORD: C.CATEGORY_WORD}
    if cat in table:
        return table[cat]
    if cat in negated:
        f = table[negated[cat]]
        return lambda c: not f(c)
    raise RuleError(f"regex category {cat} is not supported in selectors")


class _Compiler:
    def __init__(self, pattern: str):
        self.pattern = pattern
        self.prog: list[tuple] = []

    def emit(self, *ins) -> int:
        if len(self.prog) >= MAX_PROGRAM:
            raise RuleError(f"regex {self.pattern!r} is too large once its counted repeats are expanded (more than "
                            f"{MAX_PROGRAM:,} steps); use a simpler pattern, e.g. fewer or smaller {{m,n}} counts.")
        self.prog.append(ins)
        return len(self.prog) - 1

    def patch(self, at: int, *ins) -> None:
        self.prog[at] = ins

    # ---------------------------------------------------------------------------------- char predicates
    def pred(self, op, av, flags: int) -> Callable[[str], bool]:
        if op is C.LITERAL:
            base = lambda c, x=chr(av): c == x                         # noqa: E731
        elif op is C.NOT_LITERAL:
            lit = self.pred(C.LITERAL, av, flags)
            return lambda c: not lit(c)
        elif op is C.ANY:
            dotall = bool(flags & C.SRE_FLAG_DOTALL)
            return lambda c: dotall or c != "\n"
        elif op is C.IN:
            return self.charset(av, flags)
        else:                                                           # pragma: no cover - parser invariant
            raise RuleError(f"regex {self.pattern!r}: unsupported element {op}")
        return self.fold(base, flags)

    @staticmethod
    def fold(f: Callable[[str], bool], flags: int) -> Callable[[str], bool]:
        if not flags & C.SRE_FLAG_IGNORECASE:
            return f
        return lambda c: f(c) or f(c.lower()) or f(c.upper())

    def charset(self, items, flags: int) -> Callable[[str], bool]:
        negate = bool(items) and items[0][0] is C.NEGATE
        tests: list[Callable[[str], bool]] = []
        for op, av in items[1:] if negate else items:
            if op is C.LITERAL:
                tests.append(lambda c, x=chr(av): c == x)
            elif op is C.RANGE:
                tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
            elif op is C.CATEGORY:
                tests.append(_category(av, bool(flags & C.SRE_FLAG_ASCII)))
            else:                                                       # pragma: no cover - parser invariant
                raise RuleError(f"regex {self.pattern!r}: unsupported set element {op}")
        # categories already follow case rules; folding them again is harmless
        inside = self.fold(lambda c: any(t(c) for t in tests), flags)
        return (lambda c: not inside(c)) if negate else inside

    # ---------------------------------------------------------------------------------- structure
    def seq(self, items, flags: int) -> None:
        for op, av in items:
            self.item(op, av, flags)

    def item(self, op, av, flags: int) -> None:
        name = str(op)
        if name in _UNSUPPORTED:
            raise RuleError(f"regex {self.pattern!r} uses {_UNSUPPORTED[name]}, which selectors do not support (they "
                            "are matched in linear time, without backtracking); rewrite it without them.")
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            self.emit(_CHAR, self.pred(op, av, flags))
        elif op is C.SUBPATTERN:
            _group, add, remove, sub = av
            self.seq(sub, (flags | add) & ~remove)
        elif op is C.BRANCH:
            self.branch(av[1], flags)
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            self.repeat(*av, flags)
        elif op is C.AT:
            self.emit(_ASSERT, av, flags)
        else:
            raise RuleError(f"regex {self.pattern!r} uses {name}, which selectors do not support; use plain "
                            "characters, classes, groups, alternation and quantifiers.")

    def branch(self, alternatives, flags: int) -> None:
        ends = []
        for i, alt in enumerate(alternatives):
            if i < len(alternatives) - 1:
                split = self.emit(_SPLIT, 0, 0)
                self.seq(alt, flags)
                ends.append(self.emit(_JMP, 0))
                self.patch(split, _SPLIT, split + 1, len(self.prog))
            else:
                self.seq(alt, flags)
        for j in ends:
            self.patch(j, _JMP, len(self.prog))

    def repeat(self, lo: int, hi, sub, flags: int) -> None:
        for _ in range(lo):
            self.seq(sub, flags)
        if hi is C.MAXREPEAT or hi == C.MAXREPEAT:
            loop = self.emit(_SPLIT, 0, 0)
            self.seq(sub, flags)
            self.emit(_JMP, loop)
            self.patch(loop, _SPLIT, loop + 1, len(self.prog))
            return
        splits = []
        for _ in range(hi - lo):
            splits.append(self.emit(_SPLIT, 0, 0))
            self.seq(sub, flags)
        for s in splits:
            self.patch(s, _SPLIT, s + 1, len(self.prog))


class SafeRegex:
    """A compiled selector regex: ``SafeRegex(pattern).fullmatch(text)`` is ``re.fullmatch(pattern, text) is not
    None`` for every pattern it accepts, in time linear in ``len(text)`` (case-insensitive matching compares a
    character's lower and upper forms, which agrees with ``re`` except for a few special Unicode case foldings)."""

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise RuleError(f"a regex is a string, got {type(pattern).__name__}: {pattern!r}")
        if len(pattern) > MAX_PATTERN:
            raise RuleError(f"regex of {len(pattern):,} characters is longer than the {MAX_PATTERN:,} allowed in a "
                            "selector; split it into several selectors joined with |.")
        try:
            parsed = P.parse(pattern, 0)
        except (re.error, OverflowError, RecursionError) as e:
            raise RuleError(f"bad regex {pattern!r}: {e}") from None
        self.pattern = pattern
        comp = _Compiler(pattern)
        try:
            comp.seq(parsed, parsed.state.flags)
        except RecursionError:
            raise RuleError(f"regex {pattern[:80]!r}… nests groups too deeply for a selector.") from None
        comp.emit(_MATCH)
        self._prog = comp.prog
        self._closures: dict = {}
        self._steps: dict = {}

    # ---------------------------------------------------------------------------------- simulation
    def _assert(self, kind, flags: int, prev: str | None, nxt: str | None, last: bool) -> bool:
        multiline = bool(flags & C.SRE_FLAG_MULTILINE)
        if kind is C.AT_BEGINNING:
            return prev is None or (multiline and prev == "\n")
        if kind is C.AT_BEGINNING_STRING:
            return prev is None
        if kind is C.AT_END:
            return nxt is None or (nxt == "\n" and (last or multiline))
        if kind is C.AT_END_STRING:
            return nxt is None
        ascii_only = bool(flags & C.SRE_FLAG_ASCII)
        boundary = _word(prev, ascii_only) != _word(nxt, ascii_only)
        if kind is C.AT_BOUNDARY:
            return boundary
        if kind is C.AT_NON_BOUNDARY:
            return not boundary and (prev is not None or nxt is not None)
        raise RuleError(f"regex {self.pattern!r}: unsupported anchor {kind}")

    def _closure(self, pcs: frozenset, prev, nxt, last: bool) -> frozenset:
        key = (pcs, prev, nxt, last)
        hit = self._closures.get(key)
        if hit is not None:
            return hit
        prog, seen, stack = self._prog, set(), list(pcs)
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = prog[pc]
            if ins[0] == _SPLIT:
                stack += (ins[2], ins[1])
            elif ins[0] == _JMP:
                stack.append(ins[1])
            elif ins[0] == _ASSERT:
                if self._assert(ins[1], ins[2], prev, nxt, last):
                    stack.append(pc + 1)
        out = frozenset(pc for pc in seen if prog[pc][0] in (_CHAR, _MATCH))
        if len(self._closures) > _CACHE_LIMIT:
            self._closures.clear()
        self._closures[key] = out
        return out

    def _step(self, state: frozenset, ch: str) -> frozenset:
        key = (state, ch)
        hit = self._steps.get(key)
        if hit is not None:
            return hit
        prog = self._prog
        out = frozenset(pc + 1 for pc in state if prog[pc][0] == _CHAR and prog[pc][1](ch))
        if len(self._steps) > _CACHE_LIMIT:
            self._steps.clear()
        self._steps[key] = out
        return out

    def fullmatch(self, text: str) -> bool:
        n = len(text)
        state = self._closure(frozenset((0,)), None, text[0] if n else None, n == 1)
        for i, ch in enumerate(text):
            if not state:
                return False
            raw = self._step(state, ch)
            state = self._closure(raw, ch, text[i + 1] if i + 1 < n else None, i + 2 == n)
        match = len(self._prog) - 1
        return match in state

    def __repr__(self) -> str:
        return f"SafeRegex({self.pattern!r})"


_COMPILED: dict[str, SafeRegex] = {}


def compile_safe(pattern: str) -> SafeRegex:
    """A cached :class:`SafeRegex` (raises :class:`~peftfx.RuleError` for a bad or unsupported pattern)."""
    hit = _COMPILED.get(pattern) if isinstance(pattern, str) else None
    if hit is None:
        hit = SafeRegex(pattern)
        if len(_COMPILED) > 1000:
            _COMPILED.clear()
        _COMPILED[pattern] = hit
    return hit
