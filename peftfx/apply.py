"""The user's entry points: ``apply``, ``inspect``, ``print_trainable``, ``merge``, ``unmerge``, ``fold``.

``apply`` is ``trace`` followed by a pass list: plan (all checks; nothing changes) → build adapter modules →
``fill`` (checkpoint loaders put saved tensors in) → splice → graph-level rewrites → freeze.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .methods import MethodConfig, rules_from_data
from .model import AdapterRecord, PeftModel, require_peft
from .passes.base import PassManager
from .passes.dropout import adapter_mode_pass
from .passes.fold import fold_pass
from .passes.freeze import freeze_pass
from .passes.merge import merge_pass, unmerge_pass
from .passes.rewrite import rewrite_pass
from .passes.splice import splice_pass
from .plan import Plan, adapter_name, plan
from .sites import Site
from .trace import trace, trace_deferred
from .variants import enable_variants

__all__ = ["apply", "apply_to_graph", "inspect", "print_trainable", "trainable_parameters", "merge", "unmerge",
           "fold", "InspectReport", "Fill"]

log = logging.getLogger(__name__)

#: ``fill(pm, plan, modules)``: called with every adapter module built (name → module, recorded in
#: ``pm.peft_info.adapters``) before anything is spliced; checkpoint loaders copy saved tensors in here. If it
#: raises, the model is left as it was.
Fill = Callable[[PeftModel, Plan, "dict[str, nn.Module]"], None]


def apply(model: nn.Module, rules: Any, example_inputs: Any = None, *, dynamic: bool = True,
          fill: Fill | None = None) -> PeftModel:
    """Trace ``model`` and apply ``rules``; returns a trainable module whose only trainable parameters are
    the adapters'. ``rules``: a method config (``LoRA(...)``), a list of them, dicts, JSON/YAML text or a
    file. The model's base weights are shared (not copied) and set to ``requires_grad=False``; nothing
    about the model changes if any rule fails to match or conflicts."""
    rules = rules_from_data(rules)
    # train mode; eval (and other inputs): traced on first use. The graph's code is generated once, at the end
    pm = trace_deferred(model, example_inputs, dynamic=dynamic)
    try:
        return apply_to_graph(pm, rules, fill=fill)
    finally:
        pm.generate_code()


def apply_to_graph(pm: PeftModel, rules: list[MethodConfig], *, fill: Fill | None = None) -> PeftModel:
    """Apply ``rules`` to a traced model (see :func:`apply`); ``fill`` loads saved tensors (see :data:`Fill`)."""
    p = plan(pm, rules)
    modules: dict[str, nn.Module] = {}
    items = []
    for m in p.matches:
        name = adapter_name(pm, m.site.key, m.rule.name)
        module = m.rule.build(m.site, pm.get_parameter(m.site.weight), m.roles)
        modules[name] = module
        items.append((m.site.node, m.site.op, name, module))
        pm.peft_info.adapters[name] = AdapterRecord(name=name, method=m.rule.name, rule_index=m.rule_index,
                                                    site=m.site.describe(), node=m.site.node.name)
    # graph-level methods (GraphMethod: prompt/prefix tuning, p-tuning) build their modules from their prepared
    # edit; they are recorded as adapters so ``fill`` sees them, and rewrite the graph after the splice.
    built: dict[int, dict[str, nn.Module]] = {}
    for i, edit in p.graph_edits.items():
        built[i] = {}
        for name, (module, site) in p.rules[i].build_graph(pm, edit).items():
            modules[name] = built[i][name] = module
            pm.peft_info.adapters[name] = AdapterRecord(name=name, method=p.rules[i].name, rule_index=i, site=site)
    if fill is not None:
        try:
            fill(pm, p, modules)
        except Exception:
            pm.peft_info.adapters.clear()
            raise
    pm.peft_info.base_node_count = len(pm.graph.nodes)
    pm.peft_info.rules = list(rules)
    edits = [(p.rules[i], edit, built[i]) for i, edit in p.graph_edits.items()]
    PassManager([splice_pass.bind(items), rewrite_pass.bind(edits), freeze_pass.bind(), adapter_mode_pass.bind()])(pm)
    enable_variants(pm)      # other modes and call signatures get graphs of their own (peftfx.variants)
    log.info("applied %d rule(s) at %d site(s)", len(rules), len(items))
    return pm


def merge(model: PeftModel, *, inplace: bool = False, requantize: bool = True, safe: bool = True) -> PeftModel:
    """Fold every mergeable adapter into its weight; their nodes disappear. Returns a new module whose
    merged weights are private copies (``inplace=True`` updates the shared weights instead, saving memory
    but changing the original model's tensors too). Non-mergeable adapters stay in the graph. On a quantized
    base the weights are dequantized, merged and re-quantized (``requantize=False`` keeps them in float:
    exact, and :func:`unmerge` works). ``safe`` (default): a merged weight holding NaN or infinity raises
    :class:`PassError` naming the adapter and site, and the model is unchanged (see :mod:`peftfx.passes.merge`)."""
    from .quant import merge_quantized, quantized_weights

    require_peft(model, "merge")
    if quantized_weights(model):
        return merge_quantized(model, inplace=inplace, requantize=requantize)
    return merge_pass(model, inplace=inplace, safe=safe).graph_module


def unmerge(model: PeftModel, *, inplace: bool = False) -> PeftModel:
    """Undo :func:`merge`: subtract each merged adapter from its weight and splice its node back."""
    from .quant import check_unmerge

    require_peft(model, "unmerge")
    check_unmerge(model)
    return unmerge_pass(model, inplace=inplace).graph_module


def fold(model: PeftModel, *, inplace: bool = False) -> PeftModel:
    """Fold the input-independent adapter compute of ``model`` into constants; returns the folded model (a new
    module unless ``inplace=True``). See :mod:`peftfx.passes.fold`."""
    require_peft(model, "fold")
    return fold_pass(model, inplace=inplace).graph_module


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
                lines.append(f"rule {i}: {r.name} → {r.describe(p.graph_edits[i])}")
                continue
            lines.append(f"rule {i}: {r.name} {r.selector.to_dict()} → {len(ms)} site(s)")
            lines += [_site_line(m.site) for m in ms]
            lines += [f"    declined {k}: {why}" for j, k, why in p.declines if j == i]
        return "\n".join(lines)


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
