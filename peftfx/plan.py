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

import difflib
import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence


from ._errors import ConflictError, NoMatchError, RuleError
from .methods import MethodConfig
from .model import PeftModel, adapter_name
from .roles import assign_roles
from .rules import quote
from .sites import Site, find_sites, unadaptable_modules

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
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    p = Plan(sites=sites, rules=list(rules))
    others = unadaptable_modules(pm, sites) if any(not r.graph_level for r in p.rules) else []
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
