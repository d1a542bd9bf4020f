"""Planning: rules × sites → a :class:`Plan` (matches, declines, graph-level edits), before anything changes.

Every check runs here: a rule that matches nothing raises :class:`NoMatchError` naming the nearest sites and roles,
two rules that cannot share a site raise :class:`ConflictError`, a site a method cannot take (a site kind outside
its ``site_kinds`` whitelist, or its own ``decline``) is recorded as a decline with the reason, and graph-level
methods validate their edit (``GraphMethod.prepare``). A rule that *names* what it cannot adapt — a name without
wildcards equal to the module path or its last components (``select.name("bn")``), or a type naming the module's
class (``select.type("Conv2d")``) — on a module without a site (a norm, a transposed convolution) or on a site its
method declines raises :class:`RuleError` naming each such module and why (:class:`NoMatchError` if nothing else
matched), rather than adapting only the rest; broad selectors (globs, regexes, roles, layers, ``all``) just record
the declines. ``inspect`` (``allow_empty``) records them without raising. Adapters are named by :func:`peftfx.model.adapter_name`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence


from . import trace_cache
from ._errors import ConflictError, NoMatchError, RuleError
from .methods import MethodConfig
from .model import PeftModel, adapter_name
from .roles import assign_roles, pipeline
from .rules import quote
from .sites import Site, Unadaptable, find_sites, unadaptable_modules

__all__ = ["Plan", "Match", "plan", "adapter_name"]


@dataclass
class Match:
    rule_index: int
    rule: MethodConfig
    site: Site
    roles: set[str]


@dataclass
class Plan:
    sites: list[Site]
    rules: list[MethodConfig]
    matches: list[Match] = field(default_factory=list)
    declines: list[tuple[int, str, str]] = field(default_factory=list)   # (rule index, site key, reason)
    graph_edits: dict[int, Any] = field(default_factory=dict)   # rule index → prepared edit (graph-level rules)

    def for_rule(self, i: int) -> list[Match]:
        return [m for m in self.matches if m.rule_index == i]


def plan(pm: PeftModel, rules: Sequence[MethodConfig], *, allow_empty: bool = False) -> Plan:
    """Match every rule against the sites of a traced model. Raises before anything is changed."""
    sites, others = _analyse(pm)
    p = Plan(sites=sites, rules=list(rules))
    for i, rule in enumerate(p.rules):
        if rule.graph_level:         # graph-level methods plan themselves (GraphMethod.prepare, below)
            continue
        sel = rule.selector
        hits, named = 0, []
        for s in sites:
            if not sel.matches(s):
                continue
            reason = rule.decline_kind(s) or rule.decline(s)
            if reason:
                p.declines.append((i, s.key, reason))
                if _names(sel, s):
                    named.append((s.key, s.module_type, reason))
                continue
            roles = {r for r in s.roles if sel.matches(s.with_roles({r}))}
            p.matches.append(Match(i, rule, s, roles))
            hits += 1
        for u in others:                 # modules without a site that the rule names outright
            if sel.matches(u) and _names(sel, u):
                p.declines.append((i, u.key, u.reason))
                named.append((u.key, u.module_type, u.reason))
        if named and not allow_empty:
            raise (RuleError if hits else NoMatchError)(_unadaptable_message(i, rule, named, hits))
        if not hits and not allow_empty:
            raise NoMatchError(_no_match_message(i, rule, sites, p.declines))
    _check_conflicts(p)
    for i, rule in enumerate(p.rules):
        if rule.graph_level:
            p.graph_edits[i] = rule.prepare(pm, p, i)   # validates; raises before anything is changed
    return p


def _analyse(pm: PeftModel) -> tuple[list[Site], list[Unadaptable]]:
    """The sites (with roles and slices) and the modules without a site: everything planning derives from the graph
    and not from the rules. The first plan of a graph fresh from a trace-cache hit reuses what the first plan of an
    earlier hit of the same entry found (:func:`peftfx.trace_cache.analysis_slot`), rebuilt on this graph's nodes
    (by name) as new objects, so nothing a later pass or rule does to them reaches the cache."""
    graph = pm.graph
    slot = trace_cache.analysis_slot(graph)
    if slot is None:
        return _analysis(pm)
    nodes = {n.name: n for n in graph.nodes}
    fingerprint = (tuple(nodes), graph.__dict__.get("_peftfx_edits", 0),
                   tuple((d.name, d.run) for d in pipeline()))
    frozen = slot.get(fingerprint)
    if frozen is None:
        sites, others = _analysis(pm)
        if not slot:                      # one analysis per entry: the graph its hits give
            slot[fingerprint] = (_freeze(sites), [dataclasses.replace(u) for u in others])
        return sites, others
    return _thaw(frozen[0], nodes), [dataclasses.replace(u) for u in frozen[1]]


def _analysis(pm: PeftModel) -> tuple[list[Site], list[Unadaptable]]:
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    return sites, unadaptable_modules(pm, sites)


def _freeze(sites: list[Site]) -> list[tuple[Site, str, tuple[str, ...], tuple[str, ...]]]:
    """Each site with its nodes as names: (site without nodes, node, calls, expert products)."""
    out = []
    for s in sites:
        products = tuple(n.name for n in s.experts.products) if s.experts is not None else ()
        bare = dataclasses.replace(s, node=None, calls=(), roles=set(s.roles), slices=copy.deepcopy(s.slices),
                                   experts=None if s.experts is None else dataclasses.replace(s.experts, products=()))
        out.append((bare, s.node.name, tuple(n.name for n in s.calls), products))
    return out


def _thaw(frozen: list, nodes: dict[str, Any]) -> list[Site]:
    out = []
    for bare, node, calls, products in frozen:
        experts = None if bare.experts is None else \
            dataclasses.replace(bare.experts, products=tuple(nodes[n] for n in products))
        out.append(dataclasses.replace(bare, node=nodes[node], calls=tuple(nodes[n] for n in calls),
                                       roles=set(bare.roles), slices=copy.deepcopy(bare.slices), experts=experts))
    return out


def _check_conflicts(p: Plan) -> None:
    by_site: dict[str, list[Match]] = {}
    for m in p.matches:
        by_site.setdefault(m.site.key, []).append(m)
    for key, ms in by_site.items():
        if len(ms) < 2:
            continue
        methods = [m.rule.name for m in ms]
        if len(set(methods)) == len(methods) and all(m.rule.composes for m in ms):
            continue
        desc = "; ".join(f"rule {m.rule_index} ({m.rule.name})" for m in ms)
        raise ConflictError(
            f"site '{key}' is claimed by {desc}. Two rules of the same method, or a method that does not "
            "compose, cannot share a site. Narrow one rule's targets (e.g. & ~select.name('" + key + "')). "
            "Rules of different methods that compose (LoRA with IA3, for example) may share a site.")


def _names(sel, site) -> bool:
    """Whether a positive (not negated) name or type leaf of ``sel`` names ``site``'s module outright: a name
    without wildcards equal to its key or to its last components, or a type equal to its module class."""
    d = sel.to_dict()
    for pat in _patterns(d, ("name",)):
        if not any(c in pat for c in "*?[") and (site.key == pat or site.key.endswith("." + pat)):
            return True
    return site.module_type in _patterns(d, ("type",))


def _unadaptable_message(i: int, rule: MethodConfig, named: list[tuple[str, str, str]], hits: int) -> str:
    lines = [f"'{k}'" + (f" ({t})" if t else "") + f": {why}" for k, t, why in named[:8]]
    more = f"\n  … and {len(named) - 8} more" if len(named) > 8 else ""
    keys = [k for k, _, _ in named[:3]]
    return (f"rule {i} ({rule.name}, targets {quote(rule.selector.to_dict(), 300)}) names "
            f"{'a module' if len(named) == 1 else f'{len(named)} modules'} it cannot adapt"
            + (f" (it matched {hits} other site(s); nothing was applied)" if hits else "") + ":\n  "
            + "\n  ".join(lines) + more + "\nTake them out of the targets, or exclude them: "
            f"& ~select.name({', '.join(map(repr, keys))}).")


def _patterns(d: Any, keys: tuple[str, ...] = ("name", "regex")) -> list[str]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            if k in keys:
                out += v if isinstance(v, list) else [v]
            elif k != "not":
                out += _patterns(v, keys)
        return out
    if isinstance(d, list):
        return [x for v in d for x in _patterns(v, keys)]
    return []


def _no_match_message(i: int, rule: MethodConfig, sites: list[Site], declines) -> str:
    keys = [s.key for s in sites]
    near: list[str] = []
    for pat in _patterns(rule.selector.to_dict())[:20]:      # bounded: patterns can be long (up to 1,000 chars)
        stem = pat.replace("*", "").replace("?", "").strip(".^$\\")[:100]
        near += difflib.get_close_matches(stem, keys, n=5, cutoff=0.3)
        near += [k for k in keys if stem and stem.split(".")[-1] in k.split(".")[-1]][:3]
    near = list(dict.fromkeys(near))[:8] or keys[:8]
    roles = Counter(r for s in sites for r in s.roles)
    role_txt = ", ".join(f"{r} ({n})" for r, n in sorted(roles.items())) or "none found"
    why = [f"{k}: {r}" for j, k, r in declines if j == i][:5]
    msg = (f"rule {i} ({rule.name}, targets {quote(rule.selector.to_dict(), 300)}) matched no site.\n"
           f"  nearest site names: {', '.join(near)}\n  roles present: {role_txt}\n"
           f"  {len(sites)} sites in all; see peftfx.inspect(model, None, example_inputs) for the full list.")
    if why:
        msg += "\n  declined: " + "; ".join(why)
    lacking = [p for p in dict.fromkeys(_patterns(rule.selector.to_dict(), ("role",)))
               if not any(fnmatch.fnmatchcase(r, p) for r in roles)]
    if lacking:
        msg += f"\n  roles the rule asks for that this model lacks: {', '.join(lacking)}"
    return msg
