"""Head role: ``head``, the last projection before an output.

How: a site that no earlier detector labelled (and not an embedding) whose output reaches a graph output without
crossing another site, an attention op or a weight product peftfx cannot adapt (``ctx.blocked``: a transposed
convolution, say): only the model's final output projection is a head, never a projection inside a block whose output
goes on through weights that are not sites. It runs after every built-in detector, since "no other role" is what
makes it a head.
"""
from __future__ import annotations

from ._graph import reach
from .base import RoleContext, register_detector

__all__ = ["detect_head"]


@register_detector("head", roles=("head",), order=40, after=("attention", "mlp", "embedding"))
def detect_head(ctx: RoleContext) -> None:
    """head for every unlabelled projection that feeds an output directly."""
    g = ctx.dataflow
    outputs = [n for n in g.nodes if n.op == "output"]
    for s in ctx.sites:
        if s.roles or s.kind == "embedding":
            continue
        if any(o in reach(g, s.node, ctx.stop | set(outputs), True, ctx.blocked) for o in outputs):
            s.roles.add("head")
