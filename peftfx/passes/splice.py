"""Splice adapter modules into the graph as ``call_module`` nodes.

Guarantees: for each (site node, adapter name, module) the module is registered under ``name`` and a node
calling it is inserted next to the site — after it for "output" adapters (``y' = m(x, y)``, every former
user of ``y`` now reads ``y'``), before it for "input" adapters (the site reads ``m(x)`` instead of ``x``).
Adapters on the same site chain in the order given. The base nodes are not changed otherwise.
"""
from __future__ import annotations

from typing import Sequence

from torch import fx, nn

from ..sites import site_input, set_site_input
from .base import PassResult, fail, graph_pass

__all__ = ["splice_pass", "splice_one"]


def splice_one(gm: fx.GraphModule, site_node: fx.Node, op: str, name: str, module: nn.Module) -> fx.Node:
    if _missing(gm, name):
        gm.add_submodule(name, module)
    graph = gm.graph
    if getattr(module, "position", "output") == "input":
        x = site_input(site_node, op)
        with graph.inserting_before(site_node):
            new = graph.call_module(name, (x,))
        set_site_input(site_node, op, new)
    else:
        x = site_input(site_node, op)
        # chain after the last adapter already on this site's output
        anchor = site_node
        while len(anchor.users) == 1 and _adapter_of(next(iter(anchor.users))) is not None \
                and next(iter(anchor.users)).args[1] is anchor:
            anchor = next(iter(anchor.users))
        with graph.inserting_after(anchor):
            new = graph.call_module(name, (x, anchor))
        anchor.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    new.meta["peftfx"] = {k: v for k, v in {**site_node.meta.get("peftfx", {}), "adapter": name}.items()
                          if k != "dropout"}
    if "val" in site_node.meta:
        new.meta["val"] = site_node.meta["val"] if module.position == "output" else x.meta.get("val")
    return new


def _missing(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return False
    except AttributeError:
        return True


def _adapter_of(node: fx.Node) -> str | None:
    if node.op != "call_module":
        return None
    return node.meta.get("peftfx", {}).get("adapter")


@graph_pass("splice")
def splice_pass(gm: fx.GraphModule, items: Sequence[tuple[fx.Node, str, str, nn.Module]]) -> PassResult:
    for site_node, op, name, module in items:
        if site_node.graph is not gm.graph:
            raise fail("splice", f"site node for {name} is not in this graph", site_node)
        splice_one(gm, site_node, op, name, module)
    return PassResult(gm, bool(items))


def adapter_nodes(graph: fx.Graph) -> dict[str, fx.Node]:
    return {n.meta["peftfx"]["adapter"]: n for n in graph.nodes if _adapter_of(n) is not None}

