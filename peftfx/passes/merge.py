"""Merge and unmerge: fold mergeable adapters into the weights they modify, and back out.

``merge_pass`` is functional by default: it returns a fork whose merged weights are new tensors, so the
caller's model (and the user's original module, whose tensors the trace shares) keep their values.
Guarantees: every mergeable adapter's node is gone (a model with only mergeable adapters has exactly the
base graph's nodes, plus one ``get_attr`` per site whose weight was shared with another site — a tied
embedding/LM head — and had to be untied so that each adapter merges into its own copy), outputs equal the unmerged model up to float rounding, and the adapter parameters
are kept (unused) so ``unmerge_pass`` can restore the weights and re-splice the nodes.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..sites import canonical_weight, set_site_input
from .base import PassResult, fail, graph_pass
from .splice import adapter_nodes, splice_one

__all__ = ["merge_pass", "unmerge_pass"]

log = logging.getLogger(__name__)


def _own_weight(gm, target: str, inplace: bool, owned: set[str]) -> torch.Tensor:
    """The weight tensor to update; on a fork, a private copy replaces the shared one first."""
    w = gm.get_parameter(target)
    if inplace or target in owned:
        return w
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    fresh = nn.Parameter(w.detach().clone(), requires_grad=False)
    setattr(parent, attr, fresh)
    owned.add(target)
    return fresh


def _weight_arg(site_node, target: str):
    for i, a in enumerate(site_node.args):
        if getattr(a, "op", None) == "get_attr" and a.target == target:
            return i, a
        if getattr(a, "op", None) == "call_function" and a.args and getattr(a.args[0], "target", None) == target:
            return None, a.args[0]   # weight behind a transpose
    return None, None


def _untie_if_shared(gm, rec, site_node) -> None:
    """A weight read by other nodes too (tied embedding / LM head, a reused module) gets a private copy
    for this site before merging, so merging one adapter cannot change another site's weight."""
    target = rec.site["weight"]
    w = gm.get_parameter(target)
    readers = [n for n in gm.graph.nodes
               if n.op == "get_attr" and _is_param(gm, n.target) and gm.get_parameter(n.target) is w]
    users = {u for r in readers for u in r.users}
    own = {site_node} | {u for u in users if u.op == "call_function" and site_node in u.users}
    if users <= own:
        return
    idx, node = _weight_arg(site_node, target)
    if node is None:
        raise fail("merge", f"cannot find the weight operand {target} of the site", site_node)
    new_target = f"{target}_untied_{rec.site['key'].replace('.', '_').replace('#', '_')}"
    parent, _, attr = new_target.rpartition(".")
    holder = gm.get_submodule(parent) if parent else gm
    setattr(holder, attr, nn.Parameter(w.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(node if idx is None else site_node):
        fresh = gm.graph.get_attr(new_target)
    fresh.meta = dict(node.meta)
    if idx is None:                      # weight behind a transpose node used only by this site
        transpose = next(u for u in node.users if site_node in u.users)
        transpose.replace_input_with(node, fresh)
    else:
        site_node.replace_input_with(node, fresh)
    rec.site["weight"] = new_target
    log.info("merge: %s is shared with other sites; %s merges into a private copy %s", target, rec.name, new_target)


def _is_param(gm, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


@graph_pass("merge", inplace=False)
def merge_pass(gm, inplace: bool = False) -> PassResult:
    out = gm if inplace else gm.fork()
    nodes = adapter_nodes(out.graph)
    owned: set[str] = set()
    modified = False
    for name, rec in out.peft_info.adapters.items():
        if rec.merged:
            continue
        module = out.get_submodule(name)
        if not getattr(module, "mergeable", False):
            log.info("adapter %s (%s) is not mergeable; it stays in the graph", name, rec.method)
            continue
        node = nodes.get(name)
        if node is None:
            raise fail("merge", f"adapter {name} has no node in the graph")
        _untie_if_shared(out, rec, next(n for n in out.graph.nodes if n.name == rec.node))
        w = _own_weight(out, rec.site["weight"], inplace, owned)
        b = _own_weight(out, rec.site["bias"], inplace, owned) if rec.site.get("bias") else None
        with torch.no_grad():
            module.merge(canonical_weight(w.data, rec.site["kind"]), None if b is None else b.data)
        if module.position == "input":
            site_node = next(iter(node.users))
            set_site_input(site_node, rec.site["op"], node.args[0])
        else:
            node.replace_all_uses_with(node.args[1])
        out.graph.erase_node(node)
        rec.merged = True
        modified = True
    return PassResult(out, modified or not inplace)


@graph_pass("unmerge", inplace=False)
def unmerge_pass(gm, inplace: bool = False) -> PassResult:
    out = gm if inplace else gm.fork()
    owned: set[str] = set()
    by_name = {n.name: n for n in out.graph.nodes}
    for name, rec in out.peft_info.adapters.items():
        if not rec.merged:
            continue
        module = out.get_submodule(name)
        site_node = by_name.get(rec.node)
        if site_node is None:
            raise fail("unmerge", f"site node {rec.node!r} of adapter {name} is not in the graph")
        w = _own_weight(out, rec.site["weight"], inplace, owned)
        b = _own_weight(out, rec.site["bias"], inplace, owned) if rec.site.get("bias") else None
        with torch.no_grad():
            module.unmerge(canonical_weight(w.data, rec.site["kind"]), None if b is None else b.data)
        splice_one(out, site_node, rec.site["op"], name, module)
        rec.merged = False
    return PassResult(out, True)
