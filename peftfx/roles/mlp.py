"""MLP roles: ``mlp.up``, ``mlp.gate``, ``mlp.down``.

How: an MLP is a site (not an embedding, not already an attention projection) whose output reaches another site
through a nonlinearity, where that second site's output joins the residual stream (an add, within a few steps,
with an ancestor of the first site's input): that second site is down; the sites feeding it are up — and when
two branches are multiplied, the branch that went through the nonlinearity is gate and the other is up.
Convolutions take no MLP role.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable

import networkx as nx
import torch
from torch import fx

from ..sites import Site
from .base import RoleContext, register_detector

__all__ = ["detect_mlp"]

aten = torch.ops.aten

_ACTIVATIONS = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default,
                aten.sigmoid.default, aten.elu.default, aten.leaky_relu.default, aten.mish.default,
                aten.hardswish.default, aten.softplus.default, aten.pow.Tensor_Scalar, aten.relu6.default,
                aten.gelu_.default if hasattr(aten, "gelu_") else aten.gelu.default, aten.silu_.default,
                aten.relu_.default}
_ADDS = {aten.add.Tensor, aten.add_.Tensor}
_ATTN_ROLES = {"attn.q", "attn.k", "attn.v", "attn.o"}
#: site kinds that never take an MLP role: embedding tables, and convolutions (a CNN's conv → norm → relu → conv +
#: residual block has the MLP's shape but is not a transformer MLP; select convolutions by name or type)
_NOT_MLP = ("embedding", "conv", "experts")   # expert weights: roles/experts.py


@register_detector("mlp", roles=("mlp.up", "mlp.gate", "mlp.down"), order=20, after="attention")
def detect_mlp(ctx: RoleContext) -> None:
    """up/gate/down for every site pair that forms an MLP; sites with an attention role are left alone."""
    g, by_node = ctx.dataflow, ctx.by_node
    free = [s for s in ctx.sites if s.kind not in _NOT_MLP and not (s.roles & _ATTN_ROLES)]
    producers: dict[Site, list[tuple[Site, bool]]] = {}
    for s in free:
        for d, via_act in _reach_with_activation(g, s.node, ctx.stop, ctx.blocked):
            producers.setdefault(by_node[d], []).append((s, via_act))
    for down, prods in producers.items():
        if down.kind in _NOT_MLP or down.roles & _ATTN_ROLES or not any(act for _, act in prods):
            continue
        if not _joins_residual(g, down, [p.input for p, _ in prods], ctx.stop):
            continue
        down.roles.add("mlp.down")
        with_act = [p for p, act in prods if act]
        without = [p for p, act in prods if not act]
        if without:
            for p in without:
                p.roles.add("mlp.up")
            for p in with_act:
                p.roles.add("mlp.gate")
        else:
            for p in with_act:
                p.roles.add("mlp.up")


def _reach_with_activation(g: nx.DiGraph, start: fx.Node, stop: set[fx.Node],
                           blocked: set[fx.Node]) -> Iterable[tuple[fx.Node, bool]]:
    """(site node, reached through a nonlinearity on some path) for the first sites reached from ``start``."""
    out, seen, todo = {}, {(start, False)}, deque([(start, False)])
    while todo:
        n, act = todo.popleft()
        for m in g.successors(n):
            if m in blocked:
                continue
            a = act or (m.op == "call_function" and m.target in _ACTIVATIONS)
            if (m, a) in seen:
                continue
            seen.add((m, a))
            if m in stop:
                out[m] = out.get(m, False) or a
            elif m.op not in ("output",):
                todo.append((m, a))
    return out.items()


def _joins_residual(g: nx.DiGraph, down: Site, inputs: list[fx.Node], stop: set[fx.Node], depth: int = 8) -> bool:
    """Whether ``down``'s output meets, in an add within ``depth`` steps, a tensor from which an MLP input flows."""
    frontier, seen = [down.node], {down.node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for m in g.successors(n):
                if m in seen or m in stop:
                    continue
                seen.add(m)
                if m.op == "call_function" and m.target in _ADDS:
                    others = [a for a in m.all_input_nodes if a is not n]
                    for o in others:
                        if any(o is x or nx.has_path(g, o, x) for x in inputs):
                            return True
                nxt.append(m)
        frontier = nxt
    return False
