"""Mixture-of-experts roles: ``mlp.experts.up``, ``mlp.experts.gate``, ``mlp.experts.down`` and ``mlp.router``.

How (on ``experts`` sites, the 3-D expert weights of :mod:`peftfx.sites`): from each expert weight's product the
data flow is followed forward, not crossing another product, a site or an attention op, to the product of
another expert weight that it feeds as the activation. That weight is ``down`` when the path went through a
nonlinearity; the feeding weight is ``up`` — or, when it is split along its output features (``chunk``/``split``
of the product, as ``gate_up_proj``) and one piece goes through the nonlinearity, ``gate`` on that piece's rows
and ``up`` on the other's, with ``site.slices`` holding the rows of each (the fused weight carries both roles).
Two separate feeding weights, one through the nonlinearity: ``gate`` and ``up``. The router is the weight
matmul whose output reaches the expert products (or the gather of their weights) through a ``topk``.
"""
from __future__ import annotations

import math
import operator
from collections import deque

import torch
from torch import fx

from ..sites import Site
from .base import RoleContext, register_detector
from .mlp import _ACTIVATIONS

__all__ = ["detect_experts"]

aten = torch.ops.aten

_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}
_TOPK = {aten.topk.default}
_DEPTH = 24


@register_detector("experts", roles=("mlp.experts.up", "mlp.experts.gate", "mlp.experts.down", "mlp.router"),
                   order=22, after="mlp")
def detect_experts(ctx: RoleContext) -> None:
    experts = [s for s in ctx.sites if s.kind == "experts"]
    if not experts:
        return
    owner = {p: s for s in experts for p in s.experts.products}
    walls = set(ctx.stop) | {a[0] for a in ctx.attention} | {a[4] for a in ctx.attention}
    feeds: dict[Site, list[tuple[Site, bool, tuple[int, int] | None]]] = {}
    for s in experts:
        for start, rows in _pieces(s):
            for p, act in _reach(start, owner, walls).items():
                if owner[p] is not s:
                    feeds.setdefault(owner[p], []).append((s, act, rows))
    for down, prods in feeds.items():
        if not any(act for _, act, _ in prods):
            continue
        down.roles.add("mlp.experts.down")
        split = any(rows is not None for _, _, rows in prods)
        plain = [p for p, act, rows in prods if not act]
        for p, act, rows in prods:
            role = "mlp.experts.gate" if act and (plain or split) else "mlp.experts.up"
            p.roles.add(role)
            if rows is not None:
                p.slices[role] = rows
    _routers(ctx, owner, walls)


def _pieces(s: Site) -> list[tuple[fx.Node, tuple[int, int] | None]]:
    """Where to start walking from each product of ``s``: the product itself, or, when its output is split along
    the feature dimension into pieces, each piece with its output rows."""
    out = []
    for p in s.experts.products:
        node = p
        while len(node.users) == 1 and next(iter(node.users)).target in (aten.squeeze.dim, aten.squeeze.default,
                                                                         aten.view.default, aten.reshape.default):
            node = next(iter(node.users))
        split = next((u for u in node.users if u.target in _SPLITS), None)
        spans = _spans(split, s.out_features) if split is not None and len(node.users) == 1 else None
        if spans is None:
            out.append((p, None))
            continue
        for u in split.users:
            if u.target is operator.getitem and isinstance(u.args[1], int) and u.args[1] < len(spans):
                out.append((u, spans[u.args[1]]))
    return out


def _spans(split: fx.Node, n: int) -> list[tuple[int, int]] | None:
    """Row ranges of the pieces of a split along the last dimension of an ``n``-feature tensor."""
    val = split.args[0].meta.get("val")
    nd = val.dim() if isinstance(val, torch.Tensor) else None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if nd is None or int(dim) % nd != nd - 1:
        return None
    if split.target is aten.chunk.default:
        size = math.ceil(n / int(split.args[1]))
        sizes = [min(size, n - i) for i in range(0, n, size)]
    elif split.target is aten.split.Tensor and isinstance(split.args[1], int):
        sizes = [min(split.args[1], n - i) for i in range(0, n, split.args[1])]
    else:
        sizes = list(split.args[1])
    if not all(isinstance(x, int) for x in sizes) or sum(sizes) != n:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(a, a + b) for a, b in zip(starts, sizes)]


def _rows(node: fx.Node) -> str | None:
    val = node.meta.get("val")
    return str(val.shape[0]) if isinstance(val, torch.Tensor) and val.dim() else None


def _reach(start: fx.Node, owner: dict[fx.Node, Site], walls: set[fx.Node]) -> dict[fx.Node, bool]:
    """Expert products fed (as the activation) from ``start``, and whether through a nonlinearity. The walk keeps
    to tensors with the product's rows (one per routed token-expert pair): once the experts' outputs are combined
    per token it has left the block."""
    found: dict[fx.Node, bool] = {}
    rows = _rows(start)
    seen, todo = {(start, False)}, deque([(start, False, 0)])
    while todo:
        n, act, d = todo.popleft()
        for m in n.users:
            if m in owner and m is not start:
                found[m] = found.get(m, False) or act
                continue
            if m in walls or m.op != "call_function" or d >= _DEPTH or _rows(m) != rows:
                continue
            a = act or m.target in _ACTIVATIONS
            if (m, a) not in seen:
                seen.add((m, a))
                todo.append((m, a, d + 1))
    return found


def _routers(ctx: RoleContext, owner: dict[fx.Node, Site], walls: set[fx.Node]) -> None:
    """``mlp.router`` on weight matmuls whose output reaches an expert product (or its weight gather) through a
    ``topk``."""
    targets = set(owner)
    for p in owner:
        targets |= {n for n in p.all_input_nodes if n.op == "call_function"}
    for r in ctx.sites:
        if r.kind == "experts" or r.roles - {"mlp.router"}:
            continue
        seen, todo = {(r.node, False)}, deque([(r.node, False, 0)])
        while todo:
            n, topk, d = todo.popleft()
            if topk and n in targets:
                r.roles.add("mlp.router")
                break
            for m in n.users:
                if m in walls or m.op != "call_function" or d >= _DEPTH:
                    continue
                t = topk or m.target in _TOPK
                if (m, t) not in seen:
                    seen.add((m, t))
                    todo.append((m, t, d + 1))
