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
import json
import math
import os
import numbers
import types
import typing
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .._errors import RuleError
from ..rules import Selector, selector_from_dict
from ..rules import quote as _quote

__all__ = ["MethodConfig", "GraphMethod", "AdapterModule", "register_method", "METHODS", "rule_from_dict",
           "rules_from_data", "expand_aux", "MAX_SIZE"]

#: the largest rank / bottleneck / token count / hidden size a config accepts. A LoRA of rank r on a d×d weight
#: holds 2·r·d values, so rank 2**31 would ask for hundreds of GiB; sizes above this bound are typos.
MAX_SIZE = 65_536

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
               "embedding": "an embedding lookup", "conv": "a convolution (nn.Conv1d/2d/3d)"}
_KIND_NOUNS = {"linear": "linear weights", "linear_t": "linear weights", "embedding": "embedding tables",
               "conv": "convolutions"}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config; ``targets`` is the selector (None = the method's default roles)."""

    #: options of every rule (HF PEFT's config fields of the same names): when rules are read
    #: (:func:`rules_from_data`) a rule carrying them is split into itself plus a
    #: :class:`~peftfx.methods.modules_to_save.ModulesToSave` / :class:`~peftfx.methods.trainable_tokens.TrainableTokens`
    #: rule; keyword-only, left out of ``to_dict`` when unset
    modules_to_save: tuple[str, ...] | None = dataclasses.field(default=None, kw_only=True)
    trainable_token_indices: tuple[int, ...] | None = dataclasses.field(default=None, kw_only=True)

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
            if f.name in _AUX_FIELDS and v is None:
                continue
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
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise RuleError for bad hyperparameters (types and finiteness are already checked from the field
        annotations by :func:`check_field_types`; here go ranges and choices)."""

    # ------------------------------------------------------------------------------ checks for validate()
    def require_positive_int(self, *fields: str, optional: bool = False, maximum: int = MAX_SIZE) -> None:
        """Each field is an int in [1, ``maximum``] (not a bool); ``optional``: None is allowed too."""
        for f in fields:
            v = getattr(self, f)
            if optional and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RuleError(f"{type(self).__name__} {f} must be a positive int{' or None' if optional else ''}, "
                                f"got {v!r}")
            if v > maximum:
                raise RuleError(f"{type(self).__name__} {f}={v:,} is above the limit of {maximum:,}: adapter tensors "
                                f"grow with {f}, so this would allocate far more memory than the model itself. "
                                f"Typical values are 4 to 256.")

    def require_fraction(self, *fields: str) -> None:
        """Each field is a number in [0, 1) (a dropout probability)."""
        for f in fields:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise RuleError(f"{type(self).__name__} {f} must be in [0, 1), got {v!r}")


# ------------------------------------------------------------------------------------------- field types
_HINTS: dict[type, dict[str, Any]] = {}


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return {bool: "true or false", int: "an int", float: "a finite number", str: "a string",
            type(None): "None"}.get(tp, "a selector" if tp is Selector else getattr(tp, "__name__", str(tp)))


_BAD = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (numpy scalars become Python numbers, lists tuples), or ``_BAD``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            out = _coerce(value, a)
            if out is not _BAD:
                return out
        return _BAD
    if tp is type(None):
        return None if value is None else _BAD
    if tp is bool:
        return bool(value) if isinstance(value, (bool, np.bool_)) else _BAD
    if tp is int:
        return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else _BAD
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            return _BAD
        return value if type(value) in (int, float) else float(value)
    if tp is str:
        return value if isinstance(value, str) else _BAD
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _BAD
        item = args[0] if args else Any
        out = tuple(_coerce(v, item) for v in value)
        return _BAD if any(o is _BAD for o in out) else out
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _BAD
    return value                                  # an annotation this check does not know: left to validate()


def check_field_types(config: "MethodConfig") -> None:
    """Every dataclass field of ``config`` has the type its annotation names — ints are ints (not bools, not
    strings), floats are finite numbers (NaN and ±inf are refused), strings are strings, selectors are selectors —
    or a :class:`RuleError` naming the method, the field, what was expected and what was given. The one type
    check behind the Python API, rules as data, the CLI and Hugging Face config import."""
    cls = type(config)
    hints = _HINTS.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:                         # pragma: no cover - an annotation that cannot be resolved
            hints = {}
        hints = _HINTS[cls] = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    for name, tp in hints.items():
        value = getattr(config, name)
        out = _coerce(value, tp)
        if out is _BAD:
            extra = (" (NaN and infinity are not allowed)" if isinstance(value, float) and not math.isfinite(value)
                     else "")
            raise RuleError(f"{cls.__name__} {name} must be {_describe(tp)}{extra}, got {type(value).__name__} "
                            f"{value!r}")
        if out is not value:
            object.__setattr__(config, name, out)


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
        raise RuleError(f"a rule in data form is a dict with a 'method' key, such as {{'method': 'lora', 'rank': 8}}; "
                        f"got {_quote(data)}")
    data = dict(data)
    method = data.pop("method")
    key = method.lower() if isinstance(method, str) else None
    cls = METHODS.get(key) or METHODS.get(_ALIASES.get(key, "")) if key is not None else None
    if cls is None:
        raise RuleError(f"unknown method {_quote(method)}; known methods: {', '.join(sorted(METHODS))}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in names), key=repr)
    if unknown:
        raise RuleError(f"method {method!r} has no option(s) {unknown}; its options are {sorted(names)}")
    for f in dataclasses.fields(cls):
        if f.name in data and isinstance(data[f.name], list) and f.name != "targets":
            data[f.name] = tuple(data[f.name])
    try:
        return cls(**data)
    except RuleError as e:
        raise RuleError(f"{e} (in rule {_quote({'method': method, **data})})") from None
    except (TypeError, ValueError) as e:
        raise RuleError(f"bad options for method {method!r}: {e}") from None


_RULE_FILES = (".json", ".yaml", ".yml")


def _read_rules_file(path: str) -> str:
    if os.path.isdir(path):
        raise RuleError(f"rules path {path!r} is a folder; give a .json or .yaml file with a list of rules.")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise RuleError(f"rules file {path!r} is not UTF-8 text ({e.reason} at byte {e.start}); rules are a JSON "
                        "or YAML list.") from None
    except OSError as e:
        raise RuleError(f"cannot read rules file {path!r}: {e.strerror or e}.") from None


def _parse_text(text: str, path: str) -> Any:
    """JSON for ``.json`` files, YAML for ``.yaml``/``.yml``; other text is tried as JSON when it looks like JSON,
    then as YAML. Any failure of the parsers (syntax, YAML tags that would build Python objects — ``safe_load``
    refuses them —, bad characters, huge numbers, deep nesting) is a :class:`RuleError` naming the file."""
    where = f"rules file {path!r}" if path else "rules text"
    if path.endswith(".json") or (not path.endswith((".yaml", ".yml")) and text.lstrip().startswith(("{", "["))):
        try:
            return json.loads(text)
        except RecursionError:
            raise RuleError(f"{where} nests too deeply to be rules") from None
        except ValueError as e:
            if path.endswith(".json"):
                raise RuleError(f"{where} is not valid JSON ({e}); rules are a JSON list of rules such as "
                                '[{"method": "lora", "rank": 8}]') from None
    try:
        import yaml
    except ImportError:
        raise RuleError("reading YAML rules needs PyYAML: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)            # safe_load: YAML tags that would build Python objects are errors
    except RecursionError:
        raise RuleError(f"{where} nests too deeply to be rules") from None
    except Exception as e:                     # yaml.YAMLError (scanner, parser, constructor, reader), ValueError
        first = " ".join(str(e).split())[:300]
        raise RuleError(f"{where} is not valid YAML or JSON ({type(e).__name__}: {first}); rules are a list of "
                        "rules such as [{method: lora, rank: 8}]") from None


def rules_from_data(data: Any) -> list[MethodConfig]:
    """A rule, a list of rules, dicts, a JSON/YAML string or a path to a .json/.yaml file → rule objects. Every
    problem — an unreadable file, bad JSON/YAML, a malformed rule or selector, a bad hyperparameter — is a
    :class:`RuleError` naming it."""
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        if isinstance(text, bytes):
            raise RuleError(f"rules path must be text, got bytes {_quote(text)}")
        path = ""
        if "\n" not in text and len(text) < 4096 and (os.path.exists(text) or text.endswith(_RULE_FILES)):
            if not os.path.exists(text):
                raise RuleError(f"rules file {text!r} not found (a .json or .yaml file with a list of rules).")
            path, text = text, _read_rules_file(text)
        data = _parse_text(text, path)
        if isinstance(data, dict) and "rules" in data:
            data = data["rules"]
    if isinstance(data, (MethodConfig, dict)):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise RuleError(f"expected one rule or a non-empty list of rules, got {_quote(data)}")
    return expand_aux([rule_from_dict(d) for d in data])


_AUX_FIELDS = ("modules_to_save", "trainable_token_indices")


def expand_aux(rules: list[MethodConfig]) -> list[MethodConfig]:
    """Each rule with ``modules_to_save`` / ``trainable_token_indices`` becomes itself without them, followed by a
    ``modules_to_save`` / ``trainable_tokens`` rule (registered methods, looked up by name)."""
    out: list[MethodConfig] = []
    for r in rules:
        mts, tti = r.modules_to_save, r.trainable_token_indices
        if not mts and not tti:
            out.append(r)
            continue
        out.append(dataclasses.replace(r, modules_to_save=None, trainable_token_indices=None))
        if mts:
            out.append(METHODS["modules_to_save"](names=tuple(mts)))
        if tti:
            out.append(METHODS["trainable_tokens"](token_indices=tuple(tti)))
    return out
