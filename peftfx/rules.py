"""Selectors pick sites; a rule is a method config plus a selector (its ``targets``).

Selectors combine with ``&``, ``|``, ``~`` and round-trip to plain data::

    select.role("attn.q") | select.role("attn.v")      ⇄  {"or": [{"role": "attn.q"}, {"role": "attn.v"}]}
    select.name("*.mlp.*") & select.layer(range(2, 4)) ⇄  {"and": [{"name": "*.mlp.*"}, {"layer": [2, 3]}]}

Name globs match a site's key (its module path); a bare name without dots or wildcards (``"q_proj"``)
matches the last component, as Hugging Face PEFT's ``target_modules`` does. Types match the module class
name (``"Linear"``, ``"Conv1D"``), the op (``"linear"``, ``"addmm"``, ``"matmul"``, ``"embedding"``) or the
site kind. Roles are globs over the roles of :mod:`peftfx.roles` (``"attn.*"``, ``"mlp.down"``).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ._errors import RuleError
from .roles import ROLES

__all__ = ["Selector", "select", "selector_from_dict"]


class Selector:
    """A predicate over sites. Subclasses implement ``matches`` and ``to_dict``."""

    def matches(self, site) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __and__(self, other: "Selector") -> "Selector":
        return _And((self, _check(other)))

    def __or__(self, other: "Selector") -> "Selector":
        return _Or((self, _check(other)))

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
        raise RuleError(f"selectors combine with other selectors, got {type(x).__name__}: {x!r}")
    return x


@dataclass(frozen=True, eq=False, repr=False)
class _Name(Selector):
    pattern: str

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
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise RuleError(f"bad regex {self.pattern!r}: {e}") from None

    def matches(self, site) -> bool:
        return re.fullmatch(self.pattern, site.key) is not None

    def to_dict(self):
        return {"regex": self.pattern}


@dataclass(frozen=True, eq=False, repr=False)
class _Type(Selector):
    names: tuple[str, ...]

    def matches(self, site) -> bool:
        return any(n in (site.module_type, site.op, site.kind) for n in self.names)

    def to_dict(self):
        return {"type": list(self.names)}


@dataclass(frozen=True, eq=False, repr=False)
class _Layer(Selector):
    layers: tuple[int, ...]

    def matches(self, site) -> bool:
        return site.layer is not None and site.layer in self.layers

    def to_dict(self):
        return {"layer": list(self.layers)}


@dataclass(frozen=True, eq=False, repr=False)
class _Role(Selector):
    pattern: str

    def __post_init__(self):
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

    def matches(self, site) -> bool:
        return all(p.matches(site) for p in self.parts)

    def to_dict(self):
        return {"and": [p.to_dict() for p in self.parts]}


@dataclass(frozen=True, eq=False, repr=False)
class _Or(Selector):
    parts: tuple[Selector, ...]

    def matches(self, site) -> bool:
        return any(p.matches(site) for p in self.parts)

    def to_dict(self):
        return {"or": [p.to_dict() for p in self.parts]}


@dataclass(frozen=True, eq=False, repr=False)
class _Not(Selector):
    part: Selector

    def matches(self, site) -> bool:
        return not self.part.matches(site)

    def to_dict(self):
        return {"not": self.part.to_dict()}


def _layers(x: int | Iterable[int]) -> tuple[int, ...]:
    if isinstance(x, bool):
        raise RuleError(f"layer index must be an int or a range, got {x!r}")
    if isinstance(x, int):
        return (x,)
    try:
        return tuple(int(i) for i in x)
    except TypeError:
        raise RuleError(f"layer must be an int, a range or a list of ints, got {x!r}") from None


class select:
    """Selector constructors: ``select.name``, ``select.regex``, ``select.type``, ``select.layer``,
    ``select.role``, ``select.all``, and ``select.from_dict`` for the data form."""

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
        return _Type(tuple(n if isinstance(n, str) else n.__name__ for n in names))

    @staticmethod
    def layer(layers: int | Iterable[int]) -> Selector:
        return _Layer(_layers(layers))

    @staticmethod
    def role(*patterns: str) -> Selector:
        return _any([_Role(p) for p in patterns], "role")

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
    """Inverse of ``Selector.to_dict``. Also takes a string (a name glob) or a list (any of)."""
    if isinstance(data, Selector):
        return data
    if isinstance(data, str):
        return _Name(data)
    if isinstance(data, list):
        return _Or(tuple(selector_from_dict(d) for d in data))
    if not isinstance(data, dict) or len(data) != 1:
        raise RuleError(f"a selector in data form is a one-key dict such as {{'role': 'attn.q'}}, got {data!r}")
    (k, v), = data.items()
    if k == "name":
        return select.name(*(v if isinstance(v, list) else [v]))
    if k == "regex":
        return _Regex(v)
    if k == "type":
        return _Type(tuple(v if isinstance(v, list) else [v]))
    if k == "layer":
        if isinstance(v, dict):
            return _Layer(tuple(range(int(v.get("start", 0)), int(v["stop"]))))
        return _Layer(_layers(v))
    if k == "role":
        return select.role(*(v if isinstance(v, list) else [v]))
    if k == "all":
        return _All()
    if k in ("and", "or"):
        parts = tuple(selector_from_dict(d) for d in v)
        return _And(parts) if k == "and" else _Or(parts)
    if k == "not":
        return _Not(selector_from_dict(v))
    raise RuleError(f"unknown selector key {k!r}; expected one of name, regex, type, layer, role, all, and, or, not")
