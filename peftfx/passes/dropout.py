"""Make dropout follow ``train()``/``eval()``. ``torch.export`` freezes the train flag of ``aten.dropout``
and the ``dropout_p`` of ``scaled_dot_product_attention`` as constants. ``mode_dropout_pass`` records which
argument is mode-dependent in ``node.meta["peftfx"]["dropout"]``; ``dropout_mode_pass`` (run by
:meth:`PeftModel.train`) writes the argument for train or eval mode. ``adapter_mode_pass`` (run last by ``apply``
and ``add_adapter``) gives newly built adapter modules — built in train mode, as every ``nn.Module`` is — the
model's mode, so an adapter's own dropout is off from the first call on a model in eval mode."""
from __future__ import annotations

import torch
from torch import fx

from .base import PassResult, graph_pass

__all__ = ["mode_dropout_pass", "dropout_mode_pass", "adapter_mode_pass"]

aten = torch.ops.aten
_FLAG_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                  aten.feature_alpha_dropout.default}


@graph_pass("mode_dropout", structural=False)      # metadata only
def mode_dropout_pass(gm: fx.GraphModule) -> PassResult:
    modified = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _FLAG_DROPOUTS:
            spec = {"kind": "flag"}
        elif node.target is aten.scaled_dot_product_attention.default:
            p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
            if not p:
                continue
            spec = {"kind": "sdpa", "p": float(p)}
        else:
            continue
        node.meta.setdefault("peftfx", {})["dropout"] = spec
        modified = True
    if modified and hasattr(gm, "_graph_mode"):
        gm._graph_mode = None  # force the next train()/eval() to write the arguments
    return PassResult(gm, modified)


@graph_pass("dropout_mode", structural=False)      # constant arguments only
def dropout_mode_pass(gm: fx.GraphModule, mode: bool) -> PassResult:
    """Every recorded dropout argument set for ``mode`` (train: the traced rate; eval: off)."""
    changed = False
    for node in gm.graph.nodes:
        spec = node.meta.get("peftfx", {}).get("dropout")
        if spec is not None:
            changed |= _set_dropout(node, spec, mode)
    return PassResult(gm, changed)


def _set_dropout(node: fx.Node, spec: dict, mode: bool) -> bool:
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if spec["kind"] == "flag":          # aten.dropout(x, p, train)
        args = args[:2] + (mode,) + args[3:]
    elif len(args) > 4:                 # sdpa(q, k, v, mask, dropout_p, …)
        args = args[:4] + (spec["p"] if mode else 0.0,) + args[5:]
    else:
        kwargs["dropout_p"] = spec["p"] if mode else 0.0
    if args == tuple(node.args) and kwargs == dict(node.kwargs):
        return False
    node.args, node.kwargs = args, kwargs
    return True


@graph_pass("adapter_mode")
def adapter_mode_pass(gm: fx.GraphModule) -> PassResult:
    """Every adapter module (and its submodules: dropout, prompt encoders) in the model's train/eval mode. The graph
    is not changed."""
    mode = gm.training
    for name in getattr(gm, "peft_info").adapters:
        module = gm.get_submodule(name)
        if any(m.training is not mode for m in module.modules()):
            module.train(mode)
    return PassResult(gm, False)
