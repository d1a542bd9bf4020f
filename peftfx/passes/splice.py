"""Splice adapter modules into the graph as ``call_module`` nodes.

Guarantees: for each (site node, adapter name, module) the module is registered under ``name`` and a node
calling it is inserted next to the site — after it for "output" adapters (``y' = m(x, y)``, every former
user of ``y`` now reads ``y'``), before it for "input" adapters (the site reads ``m(x)`` instead of ``x``).
Adapters on the same site chain in the order given (an output adapter re-spliced after unmerge goes back
to its place in ``peft_info.adapters`` order), and every output adapter reads the input the weight reads
(the output of the site's input adapters). A module called several times (ALBERT's shared layer) is one site:
its adapter module is called at every call of the weight (one module, one set of parameters, several nodes).
The base nodes are not changed otherwise.
"""
from __future__ import annotations

from typing import Sequence

from torch import fx, nn

from .._util import find_submodule
from ..model import adapter_of, output_chain
from ..sites import WEIGHT_INDEX, call_index, set_site_input, site_calls, site_input
from .base import PassResult, fail, graph_pass
from .checks import adapters_called_once

__all__ = ["splice_pass", "splice_one", "adapter_calls"]


def splice_one(gm: fx.GraphModule, site_node: fx.Node, op: str, name: str, module: nn.Module, *,
               index: dict | None = None) -> fx.Node:
    """Splice ``module`` (registered as ``name``) at ``site_node`` and at every other call of the same site (a
    module called several times: :func:`peftfx.sites.site_calls`, ``index`` its :func:`~peftfx.sites.call_index`);
    returns the node at ``site_node``."""
    if find_submodule(gm, name) is None:
        gm.add_submodule(name, module)
    calls = site_calls(gm, site_node, index)
    if site_node not in calls:
        calls = [site_node]
    new = [_splice_at(gm, n, op, name, module) for n in calls]
    return new[calls.index(site_node)]


def adapter_calls(graph: fx.Graph, name: str) -> list[fx.Node]:
    """Every node that calls the adapter ``name`` (one per call of its site)."""
    return [n for n in graph.nodes if adapter_of(n) == name]


def _splice_at(gm: fx.GraphModule, site_node: fx.Node, op: str, name: str, module: nn.Module) -> fx.Node:
    graph = gm.graph
    if getattr(module, "position", "output") == "input":
        x = site_input(site_node, op)
        with graph.inserting_before(site_node):
            new = graph.call_module(name, (x,))
        set_site_input(site_node, op, new)
        _rewire_outputs(site_node, x, new)
    else:
        x = site_input(site_node, op)
        # chain after the last adapter already on this site's output that was spliced before this one
        rank = _ranks(gm, name)
        anchor = site_node
        for user in output_chain(site_node):
            if rank.get(adapter_of(user), -1) >= rank[name]:
                break
            anchor = user
        extra = _base_operands(site_node, op) if getattr(module, "reads_weight", False) else ()
        with graph.inserting_after(anchor):
            new = graph.call_module(name, (x, anchor) + extra)
        anchor.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    new.meta["peftfx"] = {k: v for k, v in {**site_node.meta.get("peftfx", {}), "adapter": name}.items()
                          if k != "dropout"}
    if "val" in site_node.meta:
        new.meta["val"] = site_node.meta["val"] if module.position == "output" else x.meta.get("val")
    return new


def _base_operands(site_node: fx.Node, op: str) -> tuple:
    """(weight as stored, bias or None) of a site, for ``reads_weight`` adapters (``m(x, y, w, b)``)."""
    w = site_node.args[WEIGHT_INDEX[op]]
    if w.op == "call_function":          # mm(x, t(W)): the parameter behind the transpose
        w = w.args[0]
    if op == "linear":
        return w, (site_node.args[2] if len(site_node.args) > 2 else None)
    return w, (site_node.args[0] if op == "addmm" else None)


def _ranks(gm: fx.GraphModule, name: str) -> dict[str, float]:
    """Splice order of the adapters (``peft_info.adapters`` order); ``name`` last if it is not recorded."""
    info = getattr(gm, "peft_info", None)
    rank: dict[str, float] = {n: i for i, n in enumerate(info.adapters)} if info is not None else {}
    rank.setdefault(name, float("inf"))
    return rank


def _rewire_outputs(site_node: fx.Node, old: fx.Node, new: fx.Node) -> None:
    """Output adapters of the site read the input the weight reads: ``old`` → ``new`` along the chain."""
    for user in output_chain(site_node):
        if user.args[0] is old:
            user.args = (new,) + tuple(user.args[1:])


@graph_pass("splice", ensures=[adapters_called_once])
def splice_pass(gm: fx.GraphModule, items: Sequence[tuple[fx.Node, str, str, nn.Module]]) -> PassResult:
    index = call_index(gm) if len(items) > 1 else None      # one scan of the graph for every site's calls
    for site_node, op, name, module in items:
        if site_node.graph is not gm.graph:
            raise fail("splice", f"site node for {name} is not in this graph", site_node)
        splice_one(gm, site_node, op, name, module, index=index)
    return PassResult(gm, bool(items))

