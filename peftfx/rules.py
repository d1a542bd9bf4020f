"""Selectors pick sites; a rule is a method config plus a selector (its ``targets``).

Selectors combine with ``&``, ``|``, ``~`` and round-trip to plain data::

    select.role("attn.q") | select.role("attn.v")      ⇄  {"or": [{"role": "attn.q"}, {"role": "attn.v"}]}
    select.name("*.mlp.*") & select.layer(range(2, 4)) ⇄  {"and": [{"name": "*.mlp.*"}, {"layer": [2, 3]}]}

Name globs match a site's key (its module path); a bare name without dots or wildcards (``"q_proj"``)
matches the last component, as Hugging Face PEFT's ``target_modules`` does. Types match the module class
name (``"Linear"``, ``"Conv1D"``), the op (``"linear"``, ``"addmm"``, ``"matmul"``, ``"embedding"``) or the
site kind. Roles are globs over the roles of :mod:`peftfx.roles` (``"attn.*"``, ``"mlp.down"``).

Every selector checks its arguments when it is made, whether from Python or from data, and the data form is read
strictly: a fragment that is not exactly one of the forms below raises :class:`RuleError` quoting it (``{"all":
false}``, ``{"and": []}``, ``{"layer": "12"}``, ``{"name": 5}`` are errors, never a guess). Regexes are matched
in linear time by :mod:`peftfx._saferegex` (no pattern can hang), and selectors nest at most :data:`MAX_DEPTH`
deep (a data form holds at most :data:`MAX_NODES` entries).

    {"name": "q_proj" | [...]}   {"regex": "…"}   {"type": "Linear" | [...]}   {"role": "attn.q" | [...]}
    {"layer": 3 | [0, 1] | {"start": 0, "stop": 4}}   {"all": true}
    {"and": [sel, …]}   {"or": [sel, …]}   {"not": sel}     "glob" (= name)     [sel, …] (= or)
"""
from __future__ import annotations

import fnmatch
import numbers
import reprlib
from dataclasses import dataclass
from typing import Any, Iterable

from ._errors import RuleError
from ._saferegex import MAX_PATTERN, compile_safe
from .roles import ROLES

__all__ = ["Selector", "select", "selector_from_dict", "MAX_DEPTH", "MAX_NODES", "MAX_LAYERS"]

MAX_DEPTH = 64          # selectors nested deeper than this are refused (no real selector comes close)
MAX_NODES = 10_000      # entries in one selector's data form (YAML aliases can make small text huge)
MAX_LAYERS = 100_000    # layer indices in one layer selector


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 4, 6, 8, 8, 80, 80


def quote(data: Any, limit: int = 160) -> str:
    """A short repr of user data for error messages, bounded in size and in time (YAML aliases can make a few
    lines of text into a structure with billions of entries; ``repr`` of it would never finish)."""
    text = _REPR.repr(data)
    return text if len(text) <= limit else text[:limit] + "…"


_quote = quote


def _pattern(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise RuleError(f"a {what} pattern is a non-empty string, got {_quote(value)}")
    if len(value) > MAX_PATTERN:
        raise RuleError(f"a {what} pattern of {len(value):,} characters is longer than the {MAX_PATTERN:,} allowed: "
                        f"{_quote(value)}")
    return value


class Selector:
    """A predicate over sites. Subclasses implement ``matches`` and ``to_dict``."""

    def matches(self, site) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    depth: int = 1     # nesting depth (1 for a leaf); composites refuse to exceed MAX_DEPTH

    def __and__(self, other: "Selector") -> "Selector":
        return _And(_flat(_And, self, _check(other)))   # a & b & c is one _And: chains do not nest

    def __or__(self, other: "Selector") -> "Selector":
        return _Or(_flat(_Or, self, _check(other)))

    def __invert__(self) -> "Selector":
        return _Not(self)

    def __repr__(self) -> str:
        return f"select.from_dict({self.to_dict()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Selector) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))


def _check(x: Any) -> Selector:
    if not isinstance(x, Selector):
        raise RuleError(f"selectors combine with other selectors, got {type(x).__name__}: {_quote(x)}")
    return x


def _flat(kind: type, a: Selector, b: Selector) -> tuple[Selector, ...]:
    return (a.parts if type(a) is kind else (a,)) + (b.parts if type(b) is kind else (b,))


def _nest(self: Selector, children: tuple[Selector, ...]) -> None:
    depth = 1 + max(c.depth for c in children)
    if depth > MAX_DEPTH:
        raise RuleError(f"selector nested {depth} deep; at most {MAX_DEPTH} levels are allowed (flatten and/or "
                        "chains into one list)")
    object.__setattr__(self, "depth", depth)


@dataclass(frozen=True, eq=False, repr=False)
class _Name(Selector):
    pattern: str

    def __post_init__(self):
        _pattern(self.pattern, "name")

    def matches(self, site) -> bool:
        key, p = site.key, self.pattern
        if fnmatch.fnmatchcase(key, p):
            return True
        if not any(c in p for c in "*?["):
            return key == p or key.endswith("." + p)
        return False

    def to_dict(self):
        return {"name": self.pattern}


@dataclass(frozen=True, eq=False, repr=False)
class _Regex(Selector):
    pattern: str

    def __post_init__(self):
        object.__setattr__(self, "_compiled", compile_safe(_pattern(self.pattern, "regex")))

    def matches(self, site) -> bool:
        return self._compiled.fullmatch(site.key)

    def to_dict(self):
        return {"regex": self.pattern}


@dataclass(frozen=True, eq=False, repr=False)
class _Type(Selector):
    names: tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.names, tuple) or not self.names:
            raise RuleError(f"a type selector needs at least one module class or op name, got {_quote(self.names)}")
        for n in self.names:
            _pattern(n, "type")

    def matches(self, site) -> bool:
        return any(n in (site.module_type, site.op, site.kind) for n in self.names)

    def to_dict(self):
        return {"type": list(self.names)}


@dataclass(frozen=True, eq=False, repr=False)
class _Layer(Selector):
    layers: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", _layers(self.layers))

    def matches(self, site) -> bool:
        return site.layer is not None and site.layer in self.layers

    def to_dict(self):
        return {"layer": list(self.layers)}


@dataclass(frozen=True, eq=False, repr=False)
class _Role(Selector):
    pattern: str

    def __post_init__(self):
        _pattern(self.pattern, "role")
        if not any(fnmatch.fnmatchcase(r, self.pattern) for r in ROLES):
            raise RuleError(f"unknown role {self.pattern!r}; roles are: {', '.join(ROLES)} (globs allowed, "
                            "e.g. 'attn.*')")

    def matches(self, site) -> bool:
        return any(fnmatch.fnmatchcase(r, self.pattern) for r in site.roles)

    def to_dict(self):
        return {"role": self.pattern}


@dataclass(frozen=True, eq=False, repr=False)
class _All(Selector):
    def matches(self, site) -> bool:
        return True

    def to_dict(self):
        return {"all": True}


@dataclass(frozen=True, eq=False, repr=False)
class _And(Selector):
    parts: tuple[Selector, ...]

    def __post_init__(self):
        _parts(self, "and")

    def matches(self, site) -> bool:
        return all(p.matches(site) for p in self.parts)

    def to_dict(self):
        return {"and": [p.to_dict() for p in self.parts]}


@dataclass(frozen=True, eq=False, repr=False)
class _Or(Selector):
    parts: tuple[Selector, ...]

    def __post_init__(self):
        _parts(self, "or")

    def matches(self, site) -> bool:
        return any(p.matches(site) for p in self.parts)

    def to_dict(self):
        return {"or": [p.to_dict() for p in self.parts]}


@dataclass(frozen=True, eq=False, repr=False)
class _Not(Selector):
    part: Selector

    def __post_init__(self):
        _nest(self, (_check(self.part),))

    def matches(self, site) -> bool:
        return not self.part.matches(site)

    def to_dict(self):
        return {"not": self.part.to_dict()}


def _parts(self: Selector, what: str) -> None:
    if not isinstance(self.parts, tuple) or not self.parts:
        raise RuleError(f"an {what!r} selector needs a non-empty list of selectors, got {_quote(self.parts)}")
    _nest(self, tuple(_check(p) for p in self.parts))


def _layer_index(i: Any, whole: Any) -> int:
    if isinstance(i, bool) or not isinstance(i, numbers.Integral) or int(i) < 0:
        raise RuleError(f"layer indices are ints ≥ 0 (an int, a range, a list of ints or "
                        f"{{'start': a, 'stop': b}}), got {_quote(whole)}")
    return int(i)


def _layers(x: Any, whole: Any = None) -> tuple[int, ...]:
    whole = x if whole is None else whole
    if isinstance(x, range):
        if len(x) > MAX_LAYERS:
            raise RuleError(f"a layer selector takes at most {MAX_LAYERS:,} layers, got {_quote(whole)}")
        x = tuple(x)
    elif isinstance(x, (str, bytes, dict)) or not isinstance(x, (numbers.Integral, Iterable)):
        _layer_index(x, whole)        # raises: not an int, a range or a list of ints
    if isinstance(x, numbers.Integral):
        return (_layer_index(x, whole),)
    out = []
    for i in x:
        out.append(_layer_index(i, whole))
        if len(out) > MAX_LAYERS:
            raise RuleError(f"a layer selector takes at most {MAX_LAYERS:,} layers")
    if not out:
        raise RuleError(f"a layer selector needs at least one layer index, got {_quote(whole)}")
    return tuple(out)


class select:
    """Selector constructors: ``select.name``, ``select.regex``, ``select.type``, ``select.layer``,
    ``select.role``, ``select.expert``, ``select.all``, and ``select.from_dict`` for the data form."""

    @staticmethod
    def name(*patterns: str) -> Selector:
        return _any([_Name(p) for p in patterns], "name")

    @staticmethod
    def regex(pattern: str) -> Selector:
        return _Regex(pattern)

    @staticmethod
    def type(*names: str | type) -> Selector:
        if not names:
            raise RuleError("select.type() needs at least one module class or op name")
        return _Type(tuple(n.__name__ if isinstance(n, type) else n for n in names))

    @staticmethod
    def layer(layers: int | Iterable[int]) -> Selector:
        return _Layer(_layers(layers))

    @staticmethod
    def role(*patterns: str) -> Selector:
        return _any([_Role(p) for p in patterns], "role")

    @staticmethod
    def expert(*parts: str) -> Selector:
        """Mixture-of-experts weights: ``select.expert()`` every 3-D expert weight (site kind ``experts``);
        ``select.expert("up", "down")`` those with roles ``mlp.experts.up``/``mlp.experts.down`` (``"gate"`` too,
        globs allowed); ``"router"`` adds the router (role ``mlp.router``). Sugar: the data form is the type/role
        selector it builds."""
        if not parts:
            return _Type(("experts",))
        for p in parts:
            if not isinstance(p, str) or not p:
                raise RuleError(f"select.expert() takes parts such as 'up', 'gate', 'down', 'router', got {_quote(p)}")
        return _any([_Role("mlp.router" if p == "router" else f"mlp.experts.{p}") for p in parts], "expert")

    @staticmethod
    def all() -> Selector:
        return _All()

    @staticmethod
    def from_dict(data: Any) -> Selector:
        return selector_from_dict(data)


def _any(parts: list[Selector], what: str) -> Selector:
    if not parts:
        raise RuleError(f"select.{what}() needs at least one pattern")
    return parts[0] if len(parts) == 1 else _Or(tuple(parts))


def selector_from_dict(data: Any) -> Selector:
    """Inverse of ``Selector.to_dict``. Also takes a string (a name glob) or a list (any of). Strict: anything
    that is not exactly one of the forms in the module docstring raises :class:`RuleError` quoting it."""
    return _parse(data, 1, [0])


_KEYS = "name, regex, type, layer, role, all, and, or, not"


def _strings(v: Any, key: str) -> list[str]:
    items = v if isinstance(v, list) else [v]
    if not items or not all(isinstance(x, str) and x for x in items):
        raise RuleError(f"{{{key!r}: …}} takes a non-empty string or a non-empty list of strings, got "
                        f"{_quote({key: v})}")
    return items


def _parse(data: Any, depth: int, count: list[int]) -> Selector:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise RuleError(f"selector data has more than {MAX_NODES:,} entries; write it with fewer, broader selectors")
    if depth > MAX_DEPTH:
        raise RuleError(f"selector data nested more than {MAX_DEPTH} deep; flatten and/or chains into one list")
    if isinstance(data, Selector):
        return data
    if isinstance(data, str):
        return _Name(data)
    if isinstance(data, list):
        if not data:
            raise RuleError("an empty list is not a selector; give at least one selector (or {'all': true})")
        return _Or(tuple(_parse(d, depth + 1, count) for d in data))
    if not isinstance(data, dict) or len(data) != 1 or not isinstance(next(iter(data)), str):
        raise RuleError(f"a selector in data form is a one-key dict such as {{'role': 'attn.q'}} (keys: {_KEYS}), "
                        f"a name glob or a list of selectors; got {_quote(data)}")
    (k, v), = data.items()
    if k in ("name", "role", "type"):
        items = _strings(v, k)
        if k == "type":
            return _Type(tuple(items))
        return (select.name if k == "name" else select.role)(*items)
    if k == "regex":
        if not isinstance(v, str):
            raise RuleError(f"{{'regex': …}} takes one pattern string, got {_quote(data)}")
        return _Regex(v)
    if k == "layer":
        return _Layer(_layer_data(v))
    if k == "all":
        if v is not True:
            raise RuleError(f"{{'all': …}} takes only true (every site), got {_quote(data)}; to select nothing, "
                            "leave the rule out")
        return _All()
    if k in ("and", "or"):
        if not isinstance(v, list) or not v:
            raise RuleError(f"{{{k!r}: …}} takes a non-empty list of selectors, got {_quote(data)}")
        parts = tuple(_parse(d, depth + 1, count) for d in v)
        return _And(parts) if k == "and" else _Or(parts)
    if k == "not":
        return _Not(_parse(v, depth + 1, count))
    raise RuleError(f"unknown selector key {k!r} in {_quote(data)}; expected one of {_KEYS}")


def _layer_data(v: Any) -> tuple[int, ...]:
    if isinstance(v, dict):
        if "stop" not in v or set(v) - {"start", "stop"}:
            raise RuleError(f"a layer range is {{'start': a, 'stop': b}} ('start' optional, default 0), got "
                            f"{_quote({'layer': v})}")
        start, stop = (_layer_index(v.get("start", 0), {"layer": v}), _layer_index(v["stop"], {"layer": v}))
        if stop <= start:
            raise RuleError(f"the layer range {_quote({'layer': v})} is empty (stop must be greater than start)")
        return _layers(range(start, stop), {"layer": v})
    if isinstance(v, list):
        return _layers(v, {"layer": v})
    if isinstance(v, bool) or not isinstance(v, int):
        raise RuleError(f"{{'layer': …}} takes an int, a list of ints or {{'start': a, 'stop': b}}, got "
                        f"{_quote({'layer': v})}")
    return _layers(v)
