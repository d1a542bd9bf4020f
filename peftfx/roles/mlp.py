"""MLP roles: ``mlp.up``, ``mlp.gate``, ``mlp.down``.

How: an MLP is a site (not an embedding, not already an attention projection) whose output reaches another site
through a nonlinearity, where that second site's output joins the residual stream (an add, within a few steps,
with an ancestor of the first site's input): that second site is down; the sites feeding it are up — and when
two branches are multiplied, the branch that went through the nonlinearity is gate and the other is up. When both
branches are slices of one site (a fused ``gate_up_proj``, Phi3) that site takes ``mlp.gate`` and ``mlp.up``, with
the rows of each in ``site.slices`` (found as for fused QKV: :func:`peftfx.roles.slices.rows_read`). The residual
add may join a sum whose *term* the MLP input flows from: a parallel block's ``x + attn(h) + mlp(h)`` (Cohere,
GPT-J, GPT-NeoX, Falcon) adds the MLP output to ``x + attn``. Convolutions take no MLP role.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable

import networkx as nx
import torch
from torch import fx

from ..sites import Site
from ._graph import walk_back, walk_single
from .base import RoleContext, register_detector
from .slices import as_slice, rows_read, selects_rows

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
        for node in s.nodes:
            for d, via_act in _reach_with_activation(g, node, ctx.stop, ctx.blocked):
                pairs = producers.setdefault(by_node[d], [])
                if (s, via_act) not in pairs:
                    pairs.append((s, via_act))
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
        elif len(with_act) == 1 and _fused_gate_up(g, with_act[0], down):
            pass
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


def _fused_gate_up(g: nx.DiGraph, p: Site, down: Site) -> bool:
    """A fused gate/up projection (Phi3's ``gate_up_proj``): ``down`` reads ``act(x[rows_g]) * x[rows_u]`` of the
    one site ``p``. Gives ``p`` both roles and the rows of each (``p.slices``); False when that is not the shape."""
    mul = walk_single(down.input, lambda n: n.op == "call_function" and n.target is aten.mul.Tensor, 6, False)
    if mul is None or len(mul.args) < 2 or not all(isinstance(a, fx.Node) for a in mul.args[:2]):
        return False
    out = p.out_features
    if not all(selects_rows(a, p.node) for a in mul.args[:2]):      # both halves must take rows of their own
        return False
    rows = [rows_read(a, p.node) for a in mul.args[:2]]
    if any(r is None or r.numel() in (0, out) for r in rows) or set(rows[0].tolist()) & set(rows[1].tolist()):
        return False
    act = [walk_back(a, lambda n: n is p.node or n.target in _ACTIVATIONS, 8) for a in mul.args[:2]]
    gated = [a is not None and a is not p.node for a in act]
    if gated.count(True) != 1:
        return False
    gate, up = (rows[0], rows[1]) if gated[0] else (rows[1], rows[0])
    p.roles |= {"mlp.gate", "mlp.up"}
    p.slices["mlp.gate"], p.slices["mlp.up"] = as_slice(gate, out), as_slice(up, out)
    return True


def _terms(n: fx.Node, depth: int = 4) -> list[fx.Node]:
    """``n`` and, when it is a sum, its terms (a parallel block's ``residual + attn`` before ``+ mlp``)."""
    out = [n]
    if depth and n.op == "call_function" and n.target in _ADDS:
        for a in n.all_input_nodes:
            out += _terms(a, depth - 1)
    return out


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
                    others = [t for a in m.all_input_nodes if a is not n for t in _terms(a)]
                    for o in others:
                        if any(o is x or nx.has_path(g, o, x) for x in inputs):
                            return True
                nxt.append(m)
        frontier = nxt
    return False
