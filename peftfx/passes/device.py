"""Device constants follow the weights: ``arange(device=cpu)``, ``.to(cpu)`` and the like were frozen into the
graph at trace time; after ``.to(device)`` every ``torch.device`` argument of the old device type is rewritten to
the new device. Parameters themselves are moved by ``nn.Module.to``, not here."""
from __future__ import annotations

import torch
from torch import fx

from .base import PassResult, graph_pass

__all__ = ["device_pass"]


@graph_pass("device")
def device_pass(gm: fx.GraphModule, old: torch.device, new: torch.device) -> PassResult:
    changed = False

    def fix(v):
        nonlocal changed
        if isinstance(v, torch.device) and v.type == old.type and v != new:
            changed = True
            return new
        return v

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = fx.node.map_aggregate(node.args, fix)
            node.kwargs = fx.node.map_aggregate(node.kwargs, fix)
    return PassResult(gm, changed)
