"""Remove what ``torch.export`` adds for its own checks and that would pin the graph to the example
inputs or the trace device: the input-guard module, tensor-metadata asserts (dtype/device checks)."""
from __future__ import annotations

import torch
from torch import fx

from .base import PassResult, graph_pass

__all__ = ["cleanup_pass"]

_DROP = {torch.ops.aten._assert_tensor_metadata.default}


@graph_pass("cleanup")
def cleanup_pass(gm: fx.GraphModule) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
            modified = True
        elif node.op == "call_function" and node.target in _DROP and not node.users:
            gm.graph.erase_node(node)
            modified = True
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    return PassResult(gm, modified)
