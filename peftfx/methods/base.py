"""The method contract and registry. A method is a frozen config dataclass (hyperparameters + ``targets`` selector)
registered with :func:`register_method`, plus the adapter module it builds. Nothing outside a method's own
file branches on its name: splice, merge, freeze and checkpoints ask the config and the module.

A config provides:
  ``name``                 registry key, used in the data form (``{"method": "lora", …}``); ``aliases`` more keys
  ``site_kinds``           the site kinds it takes (a whitelist, checked once in planning: a site of another
                           kind is declined with the reason, so a new site kind reaches no method that did not
                           ask for it); see ``peftfx.sites.KINDS``
  ``default_targets()``    the selector used when ``targets`` is None
  ``decline(site)``        None if the site can take this method, else the reason (recorded for inspect)
  ``build(site, weight, roles)``  the adapter module for that site (``roles``: the site's roles the
                           selector asked for, e.g. only q and v of a fused QKV weight)
An adapter module provides ``position`` ("output": ``forward(x, y) → y'``; "input": ``forward(x) → x'``),
``mergeable``, and if mergeable ``merge(w, b)``/``unmerge(w, b)`` acting in place on the canonical
``[out, in]`` weight view and bias. An "output" module with ``reads_weight = True`` (DoRA) is called
``forward(x, y, w, b)`` with the site's weight as stored and its bias (None when absent).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from .._errors import RuleError
from ..rules import Selector, selector_from_dict

__all__ = ["MethodConfig", "GraphMethod", "AdapterModule", "register_method", "METHODS", "rule_from_dict",
           "rules_from_data"]

METHODS: dict[str, type["MethodConfig"]] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type["MethodConfig"]) -> type["MethodConfig"]:
    """Register a config class under ``cls.name`` (and its ``aliases`` for the data form)."""
    for key in (cls.name, *cls.aliases):
        owner = METHODS.get(key) or METHODS.get(_ALIASES.get(key, ""))
        if owner is not None and owner.__qualname__ != cls.__qualname__:
            raise RuleError(f"method name {key!r} is registered twice ({owner.__name__} and {cls.__name__})")
    METHODS[cls.name] = cls
    _ALIASES.update({a: cls.name for a in cls.aliases})
    return cls


_KIND_WORDS = {"linear": "a linear weight matmul", "linear_t": "a matmul with a transposed stored weight (Conv1D)",
               "embedding": "an embedding lookup"}
_KIND_NOUNS = {"linear": "linear weights", "linear_t": "linear weights", "embedding": "embedding tables"}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config; ``targets`` is the selector (None = the method's default roles)."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    composes: ClassVar[bool] = False   # may share a site with a rule of another method
    site_kinds: ClassVar[frozenset[str]] = frozenset()   # whitelist of site kinds (peftfx.sites.KINDS)
    graph_level: ClassVar[bool] = False  # True: a GraphMethod, planned and applied as a whole-graph edit

    def default_targets(self) -> Selector:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def selector(self) -> Selector:
        targets = getattr(self, "targets", None)
        return self.default_targets() if targets is None else targets

    def decline(self, site) -> str | None:
        """None if this method can take ``site`` (already of a kind it supports), else the reason."""
        return None

    def decline_kind(self, site) -> str | None:
        """The whitelist check: None for a site kind in ``site_kinds``, else the reason, naming both."""
        if site.kind in self.site_kinds:
            return None
        takes = " and ".join(dict.fromkeys(_KIND_NOUNS.get(k, k) for k in sorted(self.site_kinds))) or "no sites"
        return (f"{type(self).__name__} adapts {takes} only; this site is {_KIND_WORDS.get(site.kind, site.kind)} "
                f"(kind {site.kind!r})")

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> "AdapterModule":  # pragma: no cover
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- data form
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "targets":
                v = None if v is None else v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def __post_init__(self):
        t = getattr(self, "targets", None)
        if t is not None and not isinstance(t, Selector):
            object.__setattr__(self, "targets", selector_from_dict(t))
        self.validate()

    def validate(self) -> None:
        """Raise RuleError for bad hyperparameters."""

    # ------------------------------------------------------------------------------ checks for validate()
    def require_positive_int(self, *fields: str, optional: bool = False) -> None:
        """Each field is an int ≥ 1 (not a bool); ``optional``: None is allowed too."""
        for f in fields:
            v = getattr(self, f)
            if optional and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RuleError(f"{type(self).__name__} {f} must be a positive int{' or None' if optional else ''}, "
                                f"got {v!r}")

    def require_fraction(self, *fields: str) -> None:
        """Each field is a number in [0, 1) (a dropout probability)."""
        for f in fields:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise RuleError(f"{type(self).__name__} {f} must be in [0, 1), got {v!r}")


class GraphMethod(MethodConfig):
    """A method that edits the graph as a whole rather than at one weight site (the virtual-token methods).

    Its phases mirror a site method's, so every check runs before any change:
      ``prepare(pm, plan, index) → edit``   analyse and validate during planning; raise, change nothing
      ``build_graph(pm, edit) → {name: (module, site description)}``   build its modules (recorded as adapters,
                                            so checkpoint loaders fill them before the graph changes)
      ``rewrite(pm, edit, modules)``        register the modules and change the graph; run by
                                            :func:`peftfx.passes.rewrite.rewrite_pass` (which lints and recompiles)
      ``describe(edit) → str``              one line for ``inspect``
    """

    graph_level: ClassVar[bool] = True

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> "AdapterModule":
        raise RuleError(f"{self.name} is a graph-level method; apply it with peftfx.apply(), which calls "
                        "prepare/build_graph/rewrite")

    def prepare(self, pm, plan, index: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def build_graph(self, pm, edit: Any) -> dict[str, tuple[nn.Module, dict[str, Any]]]:  # pragma: no cover
        raise NotImplementedError

    def rewrite(self, pm, edit: Any, modules: dict[str, nn.Module]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, edit: Any) -> str:
        return "graph-level rewrite"


class AdapterModule(nn.Module):
    position: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = False
    reads_weight: ClassVar[bool] = False
    reads_input: ClassVar[bool] = True    # False: an "output" module that ignores x (merge may rewire it)

    def delta(self) -> torch.Tensor:
        """For additive methods: the ``[out, in]`` update; merge/unmerge then add/subtract it."""
        raise NotImplementedError(f"{type(self).__name__} is not mergeable")

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight += self.delta().to(weight.dtype)

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight -= self.delta().to(weight.dtype)


def rule_from_dict(data: dict[str, Any]) -> MethodConfig:
    """``{"method": "lora", "rank": 8, "targets": {...}}`` → ``LoRA(rank=8, targets=...)``."""
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, dict) or "method" not in data:
        raise RuleError(f"a rule in data form is a dict with a 'method' key, got {data!r}")
    data = dict(data)
    method = data.pop("method")
    key = str(method).lower()
    cls = METHODS.get(key) or METHODS.get(_ALIASES.get(key, ""))
    if cls is None:
        raise RuleError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RuleError(f"method {method!r} has no option(s) {unknown}; its options are {sorted(names)}")
    for f in dataclasses.fields(cls):
        if f.name in data and isinstance(data[f.name], list) and f.name != "targets":
            data[f.name] = tuple(data[f.name])
    try:
        return cls(**data)
    except TypeError as e:
        raise RuleError(f"bad options for method {method!r}: {e}") from None


def rules_from_data(data: Any) -> list[MethodConfig]:
    """A rule, a list of rules, dicts, a JSON/YAML string or a path to a .json/.yaml file → rule objects."""
    import json
    import os

    if isinstance(data, (str, os.PathLike)):
        text = str(data)
        if os.path.exists(text):
            with open(text) as f:
                text = f.read()
            path = str(data)
        else:
            path = ""
        if path.endswith((".yaml", ".yml")) or (not path and not text.lstrip().startswith(("{", "["))):
            try:
                import yaml
            except ImportError:
                raise RuleError("reading YAML rules needs PyYAML: pip install pyyaml") from None
            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise RuleError(f"rules are not valid JSON ({e}); pass a list of rules or a .json/.yaml file") from None
        if isinstance(data, dict) and "rules" in data:
            data = data["rules"]
    if isinstance(data, (MethodConfig, dict)):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise RuleError(f"expected one rule or a non-empty list of rules, got {data!r}")
    return [rule_from_dict(d) for d in data]

