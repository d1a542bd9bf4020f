"""Attention roles: ``attn.q``, ``attn.k``, ``attn.v``, ``attn.o``, and ``attn.qkv`` for a fused projection.

How: an attention op is ``scaled_dot_product_attention`` or the eager pattern matmul → softmax → matmul
(:func:`peftfx.roles.attention_nodes`). Walking back from its q/k/v operands (through views, rotary, splits) to the
first weight matmul gives q/k/v; walking forward from its output to the first weight matmul gives o. Walks never
cross an attention op, nor a weight op that is not a site, and skip embedding tables and sites of another layer.
A site reached from two or more of q/k/v is a fused projection: it carries each of those roles plus ``attn.qkv``,
and ``site.slices`` the output rows of each slice — a range, or an index set where q/k/v are interleaved per head —
tracked forward from the site through views, rotary and splits (:func:`peftfx.roles.slices.slice_of`). A site with
several calls (a shared layer) is found from any of them.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..sites import Site
from ._graph import reach
from .base import RoleContext, register_detector
from .slices import slice_of

__all__ = ["detect_attention"]

_QKV = ("attn.q", "attn.k", "attn.v")


@register_detector("attention", roles=(*_QKV, "attn.qkv", "attn.o"), order=10)
def detect_attention(ctx: RoleContext) -> None:
    """q/k/v/o (and fused qkv with slices) for every attention op of the graph."""
    for node, q, k, v, out in ctx.attention:
        layer = node.meta.get("peftfx", {}).get("layer")
        operands = dict(zip(_QKV, (q, k, v)))
        hits: dict[str, set[Site]] = {}
        for role, operand in operands.items():
            if not isinstance(operand, fx.Node):
                continue
            hits[role] = _projections(ctx, operand, layer)
            for s in hits[role]:
                s.roles.add(role)
        for role, operand in operands.items():
            for s in hits.get(role, ()):
                if sum(s in h for h in hits.values()) > 1:
                    s.roles.add("attn.qkv")
                    span = next((sp for n in s.nodes if (sp := slice_of(operand, n)) is not None), None)
                    if span is not None:
                        s.slices[role] = span
        for n in reach(ctx.dataflow, out, ctx.stop, True, ctx.blocked):
            s = ctx.by_node[n]
            if _in_block(s, layer):
                s.roles.add("attn.o")


def _projections(ctx: RoleContext, operand: fx.Node, layer: Any) -> set[Site]:
    """The sites that produce ``operand``: the operand itself if it is a site, else the first sites behind it."""
    if operand in ctx.stop:
        found = {ctx.by_node[operand]}
    else:
        found = {ctx.by_node[n] for n in reach(ctx.dataflow, operand, ctx.stop, False, ctx.blocked)}
    return {s for s in found if _in_block(s, layer)}


def _in_block(s: Site, layer: Any) -> bool:
    # an embedding table is never a projection of the attention's inputs
    return s.kind != "embedding" and (layer is None or s.layer in (None, layer))
