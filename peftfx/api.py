"""``apply``, ``inspect``, ``print_trainable``: trace → match rules → splice → freeze."""
from __future__ import annotations

import difflib
import fnmatch
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from ._errors import ConflictError, NoMatchError
from .graph import AdapterRecord, PeftModel
from .methods import MethodConfig, rules_from_data
from .passes.freeze import freeze_pass
from .passes.splice import splice_pass
from .roles import assign_roles
from .sites import Site, find_sites
from .trace import trace

__all__ = ["apply", "inspect", "plan", "print_trainable", "trainable_parameters", "Plan", "Match",
           "InspectReport"]

log = logging.getLogger(__name__)


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


def _adapter_name(key: str, method: str) -> str:
    key = key.replace("#", "_call")
    return f"{key}.{method}" if key else method


def plan(pm: PeftModel, rules: Sequence[MethodConfig], *, allow_empty: bool = False) -> Plan:
    """Match every rule against the sites of a traced model. Raises before anything is changed."""
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    p = Plan(sites=sites, rules=list(rules))
    for i, rule in enumerate(p.rules):
        if getattr(rule, "graph_level", False):    # graph-level methods: see the extension point in apply_to_graph
            continue
        sel = rule.selector
        hits = 0
        for s in sites:
            if not sel.matches(s):
                continue
            reason = rule.decline(s)
            if reason:
                p.declines.append((i, s.key, reason))
                continue
            roles = {r for r in s.roles if sel.matches(s.with_roles({r}))}
            p.matches.append(Match(i, rule, s, roles))
            hits += 1
        if not hits and not allow_empty:
            raise NoMatchError(_no_match_message(i, rule, sites, p.declines))
    _check_conflicts(p)
    for i, rule in enumerate(p.rules):
        if getattr(rule, "graph_level", False):
            p.graph_edits[i] = rule.prepare(pm, p, i)   # validates; raises before anything is changed
    return p


def _is_tensor_attr(pm: nn.Module, path: str) -> bool:
    if not path:
        return False
    obj: Any = pm
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return not isinstance(obj, nn.Module)


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
    for pat in _patterns(rule.selector.to_dict()):
        stem = pat.replace("*", "").replace("?", "").strip(".^$\\")
        near += difflib.get_close_matches(stem, keys, n=5, cutoff=0.3)
        near += [k for k in keys if stem and stem.split(".")[-1] in k.split(".")[-1]][:3]
    near = list(dict.fromkeys(near))[:8] or keys[:8]
    roles = Counter(r for s in sites for r in s.roles)
    role_txt = ", ".join(f"{r} ({n})" for r, n in sorted(roles.items())) or "none found"
    why = [f"{k}: {r}" for j, k, r in declines if j == i][:5]
    msg = (f"rule {i} ({rule.name}, targets {rule.selector.to_dict()}) matched no site.\n"
           f"  nearest site names: {', '.join(near)}\n  roles present: {role_txt}\n"
           f"  {len(sites)} sites in all; see peftfx.inspect(model, None, example_inputs) for the full list.")
    if why:
        msg += "\n  declined: " + "; ".join(why)
    lacking = [p for p in dict.fromkeys(_patterns(rule.selector.to_dict(), ("role",)))
               if not any(fnmatch.fnmatchcase(r, p) for r in roles)]
    if lacking:
        msg += f"\n  roles the rule asks for that this model lacks: {', '.join(lacking)}"
    return msg


def apply(model: nn.Module, rules: Any, example_inputs: Any = None, *, dynamic: bool = True,
          _before_splice: Callable[[PeftModel, Plan, dict[str, nn.Module]], None] | None = None) -> PeftModel:
    """Trace ``model`` and apply ``rules``; returns a trainable module whose only trainable parameters are
    the adapters'. ``rules``: a method config (``LoRA(...)``), a list of them, dicts, JSON/YAML text or a
    file. The model's base weights are shared (not copied) and set to ``requires_grad=False``; nothing
    about the model changes if any rule fails to match or conflicts."""
    rules = rules_from_data(rules)
    pm = trace(model, example_inputs, dynamic=dynamic)
    return apply_to_graph(pm, rules, _before_splice=_before_splice)


def apply_to_graph(pm: PeftModel, rules: list[MethodConfig], *, _before_splice=None) -> PeftModel:
    p = plan(pm, rules)
    modules: dict[str, nn.Module] = {}
    items = []
    for m in p.matches:
        name = _adapter_name(m.site.key, m.rule.name)
        if _is_tensor_attr(pm, name.rsplit(".", 1)[0] if "." in name else ""):
            name = name.rsplit(".", 1)[0] + "_" + m.rule.name
        weight = pm.get_parameter(m.site.weight)
        module = m.rule.build(m.site, weight, m.roles)
        modules[name] = module
        items.append((m.site.node, m.site.op, name, module))
        pm.peft_info.adapters[name] = AdapterRecord(name=name, method=m.rule.name, rule_index=m.rule_index,
                                                    site=m.site.describe(), node=m.site.node.name)
    # ---- extension point: graph-level methods (``rule.graph_level = True``: prompt/prefix tuning, p-tuning) act
    # on the graph as a whole, not at one weight site. ``plan`` ran ``rule.prepare(pm, plan, i)`` (checks, no
    # change); ``rule.build_graph(pm, edit) → {name: (module, site description)}`` builds their modules, recorded
    # as adapters so checkpoints fill them in ``_before_splice``; ``rule.rewrite(pm, edit, modules)`` registers
    # them and rewrites the graph after splicing, before freezing.
    built: dict[int, dict[str, nn.Module]] = {}
    for i, edit in p.graph_edits.items():
        built[i] = {}
        for name, (module, site) in p.rules[i].build_graph(pm, edit).items():
            modules[name] = built[i][name] = module
            pm.peft_info.adapters[name] = AdapterRecord(name=name, method=p.rules[i].name, rule_index=i, site=site)
    if _before_splice is not None:
        try:
            _before_splice(pm, p, modules)
        except Exception:
            pm.peft_info.adapters.clear()
            raise
    pm.peft_info.base_node_count = len(pm.graph.nodes)
    splice_pass(pm, items)
    for i, edit in p.graph_edits.items():
        p.rules[i].rewrite(pm, edit, built[i])
    pm.peft_info.rules = list(rules)
    freeze_pass(pm)
    log.info("applied %d rule(s) at %d site(s)", len(rules), len(items))
    return pm


# ------------------------------------------------------------------------------------------- reports
@dataclass
class InspectReport:
    plan: Plan

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        return {
            "sites": [s.describe() for s in p.sites],
            "rules": [{"rule": r.to_dict(), "sites": [m.site.describe() | {"selected_roles": sorted(m.roles)}
                                                      for m in p.for_rule(i)],
                       "declined": [{"site": k, "reason": why} for j, k, why in p.declines if j == i]}
                      for i, r in enumerate(p.rules)],
        }

    def __str__(self) -> str:
        p = self.plan
        lines = []
        if not p.rules:
            lines.append(f"{len(p.sites)} sites")
            for s in p.sites:
                lines.append(_site_line(s))
        for i, r in enumerate(p.rules):
            ms = p.for_rule(i)
            if i in p.graph_edits:
                lines.append(f"rule {i}: {r.name} → {_describe_edit(r, p.graph_edits[i])}")
                continue
            lines.append(f"rule {i}: {r.name} {r.selector.to_dict()} → {len(ms)} site(s)")
            lines += [_site_line(m.site) for m in ms]
            lines += [f"    declined {k}: {why}" for j, k, why in p.declines if j == i]
        return "\n".join(lines)


def _describe_edit(rule: Any, edit: Any) -> str:
    """One line for a graph-level rule's plan (virtual tokens at the embedding, or prefixes at attention ops)."""
    n = getattr(edit, "n", getattr(rule, "num_virtual_tokens", None))
    attentions = getattr(edit, "attentions", None)
    if attentions is not None:
        layers = sorted({a.layer for a in attentions if a.layer is not None})
        span = f"layers {layers[0]}–{layers[-1]}" if layers else "no layer index"
        return (f"graph-level: {n} key/value prefix row(s) at {len(attentions)} attention op(s) ({span}; "
                f"{edit.heads_kv} kv head(s) × {edit.head_dim})")
    site = getattr(edit, "site", None)
    if site is not None:
        inputs = ", ".join(f"{ph.target} ({kind})" for ph, _, kind in getattr(edit, "inputs", []))
        return (f"graph-level: {n} virtual token(s) after {site.key} (role embed); sequence inputs widened: "
                f"{inputs or 'none'}")
    return "graph-level rewrite"


def _site_line(s: Site) -> str:
    roles = ",".join(sorted(s.roles)) or "-"
    layer = "-" if s.layer is None else s.layer
    return f"    {s.key:<50} layer {layer!s:<3} {roles:<28} {s.op:<9} {tuple(s.weight_shape)}"


def inspect(model: nn.Module, rules: Any = None, example_inputs: Any = None, *,
            dynamic: bool = True) -> InspectReport:
    """Report every site each rule takes (path, roles, layer, weight shape) and every site it declined,
    without changing the model. With ``rules=None``, list all sites and their roles."""
    rule_list = [] if rules is None else rules_from_data(rules)
    pm = model if isinstance(model, PeftModel) else trace(model, example_inputs, dynamic=dynamic)
    return InspectReport(plan(pm, rule_list, allow_empty=True))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable(model: nn.Module, *, file=None) -> str:
    """Print and return ``trainable 0.21% (65,536 of 30,400,000)`` and the sites per rule."""
    train, total = trainable_parameters(model)
    lines = [f"trainable {100.0 * train / max(total, 1):.2f}% ({train:,} of {total:,})"]
    info = getattr(model, "peft_info", None)
    if info is not None:
        per_rule = Counter(rec.rule_index for rec in info.adapters.values())
        for i, rule in enumerate(info.rules):
            n = sum(p.numel() for name, rec in info.adapters.items() if rec.rule_index == i
                    for p in model.get_submodule(name).parameters())
            lines.append(f"  rule {i}: {rule.name:<8} {per_rule.get(i, 0):>4} site(s) {n:>12,} params  "
                         f"targets {rule.selector.to_dict()}")
    text = "\n".join(lines)
    print(text, file=file)
    return text
