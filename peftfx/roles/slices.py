"""Fused-weight slices: which output rows of a fused projection (one QKV matmul) an attention operand reads.

How: walk back from the operand to the site, through views and element-wise ops such as rotary (following the
one input that leads to the site), and compose the row ranges of every ``split``/``split_with_sizes``/``chunk``/
``unbind`` (via ``getitem``) and ``slice`` met on the way, scaled by the width of the features after the split
dimension. A ``select`` (one index of a dimension) is placed by replaying the views between the site and it on the
layout of the site's output features (:func:`_layout`: which dimension carries which stride of the feature index).
Any step whose shape is symbolic, or a fork that does not single out one path, gives no slice.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from ._graph import VIEWS, is_tensor

__all__ = ["slice_of"]

aten = torch.ops.aten


def slice_of(operand: fx.Node, site: fx.Node) -> tuple[int, int] | None:
    """Output rows of ``site`` that ``operand`` reads, when a split/slice/unbind separates them."""
    node, span = operand, None
    for _ in range(64):
        if node is site:
            return span
        if node.op != "call_function":
            return None
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            src, i = node.args[0], node.args[1]
            piece = _piece(src, i)
            if piece is None:
                return None
            span = piece if span is None else (piece[0] + span[0], piece[0] + span[1])
            node = src.args[0]
            continue
        if node.target is aten.select.int:
            # x[..., i, ...] of a view of the site's output (nn.MultiheadAttention: unflatten(-1, (3, E)) then
            # select): the rows come from replaying the views between the site and x (:func:`_layout`)
            piece = _select_piece(node, site)
            if piece is None:
                return None
            return piece if span is None else (piece[0] + span[0], piece[0] + span[1])
        if node.target is aten.slice.Tensor:
            piece = _slice_piece(node)
            if piece is None:
                return None
            span = piece if span is None else (piece[0] + span[0], piece[0] + span[1])
            node = node.args[0]
            continue
        inputs = [a for a in node.all_input_nodes if is_tensor(a)]
        if node.target not in VIEWS and len(inputs) != 1:
            # rotary and similar: follow the operand that leads to the site
            inputs = [a for a in inputs if _leads_to(a, site)]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _slice_piece(node: fx.Node) -> tuple[int, int] | None:
    """Flat feature range read by ``aten.slice(x, dim, start, end)``."""
    x, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    start, end = (node.args[2] if len(node.args) > 2 else 0), node.args[3] if len(node.args) > 3 else None
    width = _feature_width(x, dim)
    if width is None or end is None:
        return None
    return (start * width, min(end, x.meta["val"].shape[dim]) * width)


def _leads_to(node: fx.Node, target: fx.Node, limit: int = 64) -> bool:
    seen, todo = set(), [node]
    while todo and len(seen) < 4096:
        n = todo.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _feature_width(x: fx.Node, dim: int) -> int | None:
    shape = x.meta["val"].shape
    dim = dim % len(shape)
    width = 1
    for d in shape[dim + 1:]:
        if not isinstance(d, int):
            return None
        width *= d
    return width


def _piece(src: fx.Node, i: int) -> tuple[int, int] | None:
    """Flat feature range of piece ``i`` of a split/split_with_sizes/chunk/unbind."""
    x = src.args[0]
    if src.target is aten.split.Tensor:
        size, dim = src.args[1], (src.args[2] if len(src.args) > 2 else 0)
        w = _feature_width(x, dim)
        return None if w is None else (i * size * w, (i + 1) * size * w)
    if src.target is aten.split_with_sizes.default:
        sizes, dim = src.args[1], (src.args[2] if len(src.args) > 2 else 0)
        w = _feature_width(x, dim)
        return None if w is None else (sum(sizes[:i]) * w, sum(sizes[: i + 1]) * w)
    if src.target is aten.chunk.default:
        chunks, dim = src.args[1], (src.args[2] if len(src.args) > 2 else 0)
        w, n = _feature_width(x, dim), x.meta["val"].shape[dim % x.meta["val"].dim()]
        size = -(-n // chunks) if isinstance(n, int) else None
        return None if w is None or size is None else (i * size * w, min((i + 1) * size, n) * w)
    if src.target is aten.unbind.int:
        dim = src.args[1] if len(src.args) > 1 else 0
        w = _feature_width(x, dim)
        return None if w is None else (i * w, (i + 1) * w)
    return None


#: views replayed by :func:`_layout` (each maps the feature stride of every dimension to the result's dimensions)
_LAYOUT_OPS = {aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int, aten.permute.default,
               aten.contiguous.default, aten.clone.default, aten.alias.default, aten.view.default,
               aten.reshape.default, aten._unsafe_view.default}


def _select_piece(node: fx.Node, site: fx.Node) -> tuple[int, int] | None:
    """Rows of ``site`` read by ``select(x, dim, i)``: ``[i·s, (i+1)·s)`` where ``s`` is the feature stride of
    ``dim`` in ``x``, when the other feature dimensions of ``x`` tile exactly ``s`` rows."""
    x, dim, i = node.args[0], node.args[1], node.args[2]
    layout = _layout(x, site)
    if layout is None or not isinstance(i, int):
        return None
    dim %= len(layout)
    stride = layout[dim][0]
    if stride is None:
        return None
    rest = sorted((st, n) for d, (st, n) in enumerate(layout) if d != dim and st is not None)
    dense = 1
    for st, n in rest:
        if st != dense:
            return None
        dense *= n
    if dense != stride:
        return None
    i %= layout[dim][1]
    return (i * stride, (i + 1) * stride)


def _layout(x: fx.Node, site: fx.Node) -> list[tuple[int | None, int]] | None:
    """Per dimension of ``x``: (stride of the site's output feature index along it, or None for a dimension that
    is not made of features; its size), when only :data:`_LAYOUT_OPS` lie between the site and ``x``."""
    chain = []
    node = x
    while node is not site:
        if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _LAYOUT_OPS:
            return None
        chain.append(node)
        node = node.args[0]
        if len(chain) > 32:
            return None
    shape = site.meta["val"].shape
    feats = shape[-1]
    if not isinstance(feats, int):
        return None
    layout: list[tuple[int | None, Any]] = [(None, d) for d in shape[:-1]] + [(1, feats)]
    for n in reversed(chain):
        layout = _replay(n, layout)
        if layout is None:
            return None
    return layout


def _replay(n: fx.Node, layout: list) -> list | None:
    t, a = n.target, n.args
    nd = len(layout)
    if t in (aten.contiguous.default, aten.clone.default, aten.alias.default):
        return layout
    if t is aten.unsqueeze.default:
        d = a[1] % (nd + 1)
        return layout[:d] + [(None, 1)] + layout[d:]
    if t is aten.squeeze.dim:
        d = a[1] % nd
        return layout[:d] + layout[d + 1:] if layout[d][1] == 1 else layout
    if t is aten.transpose.int:
        out = list(layout)
        i, j = a[1] % nd, a[2] % nd
        out[i], out[j] = out[j], out[i]
        return out
    if t is aten.permute.default:
        return [layout[d % nd] for d in a[1]]
    if t is aten.unflatten.int:
        d, sizes = a[1] % nd, list(a[2])
        stride, size = layout[d]
        if not all(isinstance(v, int) for v in sizes):
            return None
        if stride is None:
            return layout[:d] + [(None, v) for v in sizes] + layout[d + 1:]
        inner = [stride * math.prod(sizes[k + 1:]) for k in range(len(sizes))]
        return layout[:d] + list(zip(inner, sizes)) + layout[d + 1:]
    # view / reshape: leading non-feature dimensions kept, the feature block re-split in C order
    out_shape = list(n.meta["val"].shape) if "val" in n.meta else None
    lead = [size for st, size in layout if st is None]
    k = len(lead)
    if out_shape is None or any(st is None for st, _ in layout[k:]) or out_shape[:k] != lead:
        return None
    if [st for st, _ in layout[k:]] != [math.prod(sz for _, sz in layout[j + 1:]) for j in range(k, nd)]:
        return None
    tail = out_shape[k:]
    if not all(isinstance(v, int) for v in tail):
        return None
    return layout[:k] + [(math.prod(tail[j + 1:]), tail[j]) for j in range(len(tail))]
