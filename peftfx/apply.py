"""The user's entry points: ``apply``, ``inspect``, ``print_trainable``, ``merge``, ``unmerge``, ``fold``.

``apply`` is ``trace`` followed by a pass list: plan (all checks; nothing changes) → build adapter modules →
``fill`` (checkpoint loaders put saved tensors in) → splice → graph-level rewrites → freeze.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from . import trace_cache
from .methods import MethodConfig, rules_from_data
from .methods.dora import DoRA
from .methods.houlsby import Houlsby
from .methods.ia3 import IA3
from .methods.lora import LoRA
from .model import AdapterRecord, PeftModel, call_key, require_peft
from .passes.base import PassManager
from .passes.dropout import adapter_mode_pass
from .passes.fold import fold_pass
from .passes.freeze import freeze_pass
from .passes.merge import merge_pass, unmerge_pass
from .passes.rewrite import rewrite_pass
from .passes.splice import splice_pass
from .plan import Plan, adapter_name, plan
from .sites import Site
from .trace import (
    first_device,
    host_random_settings,
    trace,
    trace_deferred,
    trace_inputs,
)
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
    key = None
    if fill is None:      # apply's cache (peftfx.trace_cache): the same architecture, inputs and rules before
        kwargs, trace_kwargs = trace_inputs(model, example_inputs, dynamic)
        key = trace_cache.applied_key(model, trace_kwargs, dynamic, True, rules)
        entry = trace_cache.lookup_applied(key)
        if entry is not None:
            return _replay(entry, model, kwargs, rules, dynamic)
    # train mode; eval (and other inputs): traced on first use. The graph's code is generated once, at the end
    pm = trace_deferred(model, example_inputs, dynamic=dynamic)
    try:
        pm, p, names = _apply_to_graph(pm, rules, fill=fill)
    finally:
        pm.generate_code()
    if key is not None:
        try:
            _remember(key, pm, p, names, model, rules)
        except (TypeError, ValueError, AttributeError, KeyError, RuntimeError) as e:   # e.g. a value deepcopy refuses
            log.debug("apply's cache keeps no entry for %s: %s: %s", type(model).__name__, type(e).__name__, e)
    return pm


def apply_to_graph(pm: PeftModel, rules: list[MethodConfig], *, fill: Fill | None = None) -> PeftModel:
    """Apply ``rules`` to a traced model (see :func:`apply`); ``fill`` loads saved tensors (see :data:`Fill`)."""
    return _apply_to_graph(pm, rules, fill=fill)[0]


def _apply_to_graph(pm: PeftModel, rules: list[MethodConfig], *,
                    fill: Fill | None = None) -> tuple[PeftModel, Plan, list[str]]:
    """:func:`apply_to_graph`, also returning the plan and the adapter name of each of its matches."""
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
    return pm, p, [name for _, _, name, _ in items]


# ----------------------------------------------------------------------------------- apply's cache
#: methods whose ``build(site, weight, roles)`` reads only the site's description, the weight and the roles (not
#: the graph, nor state shared between sites), so a cached plan can build their modules for another model
_REPLAYABLE = frozenset({LoRA, DoRA, IA3, Houlsby})

#: the instance attributes ``apply`` leaves on a PeftModel; a model with any other was changed in a way the cache
#: does not record, and is not cached
_APPLIED_ATTRS = frozenset({
    "_backward_hooks", "_backward_pre_hooks", "_buffers", "_code", "_create_node_hooks", "_deepcopy_hooks",
    "_erase_node_hooks", "_forward_hooks", "_forward_hooks_always_called", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_graph", "_graph_mode", "_in_spec",
    "_is_full_backward_hook", "_lineno_map", "_load_state_dict_post_hooks", "_load_state_dict_pre_hooks", "_modules",
    "_non_persistent_buffers_set", "_out_spec", "_parameters", "_peftfx_origin", "_peftfx_quiet",
    "_peftfx_signature", "_peftfx_variants", "_peftfx_version", "_prologue_start", "_replace_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_tracer_cls", "_tracer_extras", "meta", "peft_info", "shape_env",
    "training"})


def _remember(key: str, pm: PeftModel, p: Plan, names: list[str], model: nn.Module,
              rules: list[MethodConfig]) -> None:
    """Keep what :func:`_replay` needs to build this result again for another model with the same key — when
    everything about it is recorded: replayable methods only, no graph-level edit, no state beyond the known."""
    if any(type(r) not in _REPLAYABLE for r in rules) or p.graph_edits or set(pm.__dict__) - _APPLIED_ATTRS:
        return
    if host_random_settings(model):         # its trace warns (LayerDrop/SpecAugment off): every apply should
        return
    if trace_cache.hooked(pm, pre_hooks=1) or pm._replace_hooks or pm._create_node_hooks or pm._erase_node_hooks \
            or pm._deepcopy_hooks:
        return
    code = pm.code_record()
    layout = trace_cache.layout_of(pm, model, set(pm.peft_info.adapters))
    if code is None or layout is None or sorted(set(names)) != sorted(pm.peft_info.adapters) \
            or len(set(names)) != len(names):
        return
    graph = trace_cache.copy_graph(pm.graph)
    nodes = {n.name: n for n in graph.nodes}
    source = {path: ref for path, (kind, ref), _ in layout if kind == "model"}
    builds = []
    for name, m in zip(names, p.matches):
        if m.site.weight not in source or any(n.name not in nodes for n in m.site.nodes):
            return
        site = dataclasses.replace(m.site, node=nodes[m.site.node.name],      # the template's nodes, not the model's
                                   calls=tuple(nodes[n.name] for n in m.site.calls))
        builds.append((name, m.rule_index, site, set(m.roles), source[m.site.weight]))
    info = copy.deepcopy(dataclasses.replace(pm.peft_info, rules=[]))
    trace_cache.store_applied(key, trace_cache.Applied(
        graph=graph, layout=layout, builds=builds, code=code, info=info, graph_mode=pm._graph_mode,
        training=pm.training, class_name=type(pm).__name__, meta=copy.deepcopy(pm.meta),
        modes={pm._graph_mode: (graph, code)} if pm._graph_mode is not None else {}))


def _replay(entry: trace_cache.Applied, model: nn.Module, kwargs: dict[str, Any], rules: list[MethodConfig],
            dynamic: bool) -> PeftModel:
    """What a cold ``apply`` returns for ``model``, from a cached one of the same key: the model's own tensors at
    the same paths (in the same order), adapter modules built anew (in the same order, so the same random draws),
    the cached code, and the cached graph shared until first use (each model then takes its own copy)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    built = {name: rules[i].build(site, tensors[weight], roles) for name, i, site, roles, weight in entry.builds}
    items = []
    for path, (kind, ref), persistent in entry.layout:
        value = (tensors[ref] if kind == "model" else ref.clone() if kind == "const"
                 else built[ref] if kind == "adapter" else None)
        items.append((path, value, persistent))
    pm = trace_cache.assemble(items, entry.graph, entry.class_name, modes=entry.modes)
    pm.adopt_code(entry.code)
    pm.peft_info = copy.deepcopy(entry.info)
    pm.peft_info.rules = list(rules)
    pm.peft_info.device = first_device(model)
    pm.meta = copy.deepcopy(entry.meta)
    pm.__dict__["_peftfx_origin"] = (model, call_key(kwargs, True, dynamic), dynamic)
    pm._graph_mode = entry.graph_mode
    pm.train(entry.training)            # modules (adapters too) in the mode a cold apply leaves them
    freeze_pass(pm)
    enable_variants(pm)
    log.info("applied %d rule(s) at %d site(s) (apply's cache)", len(rules), len(built))
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
