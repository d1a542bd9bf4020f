"""Embedding roles: ``embed`` (the token embedding), ``embed.aux`` (other id-fed tables, e.g. token types),
``embed.position``.

How: an embedding site whose ids flow from an integer graph input is fed by the data; the largest such table is
the token embedding (``embed``, with every site sharing its weight) and the others are ``embed.aux``. An embedding
whose ids do not come from an input (positions built inside the model) is ``embed.position``.
"""
from __future__ import annotations

import networkx as nx

from ._graph import is_tensor
from .base import RoleContext, register_detector

__all__ = ["detect_embedding"]


@register_detector("embedding", roles=("embed", "embed.position", "embed.aux"), order=30)
def detect_embedding(ctx: RoleContext) -> None:
    """embed / embed.aux / embed.position for every embedding site."""
    g = ctx.dataflow
    ints = [n for n in ctx.graph.nodes if n.op == "placeholder" and is_tensor(n)
            and not n.meta["val"].is_floating_point()]
    fed = []
    for s in ctx.sites:
        if s.kind != "embedding":
            continue
        if any(nx.has_path(g, p, s.input) for p in ints):
            fed.append(s)
        else:
            s.roles.add("embed.position")
    if fed:
        token = max(fed, key=lambda s: s.weight_shape[0])
        for s in fed:
            s.roles.add("embed" if s.weight == token.weight else "embed.aux")
