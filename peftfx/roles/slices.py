"""Fused-weight slices: which output rows of a fused projection (one QKV matmul) an attention operand reads.

How: walk back from the operand to the site, through views and element-wise ops such as rotary (following the
one input that leads to the site), and compose the row ranges of every ``split``/``split_with_sizes``/``chunk``/
``unbind`` (via ``getitem``) and ``slice`` met on the way, scaled by the width of the features after the split
dimension. Any step whose shape is symbolic, or a fork that does not single out one path, gives no slice.
"""
from __future__ import annotations

import operator

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
