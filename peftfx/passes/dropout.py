"""Make dropout follow ``train()``/``eval()``. ``torch.export`` freezes the train flag of ``aten.dropout``
and the ``dropout_p`` of ``scaled_dot_product_attention`` as constants; this pass records which
argument is mode-dependent in ``node.meta["peftfx"]["dropout"]`` and :meth:`PeftModel.train` rewrites it."""
from __future__ import annotations

import torch
from torch import fx

from .base import PassResult, graph_pass

__all__ = ["mode_dropout_pass"]

aten = torch.ops.aten
_FLAG_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                  aten.feature_alpha_dropout.default}


@graph_pass("mode_dropout")
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
