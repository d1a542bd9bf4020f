"""Fused-weight slices: which output rows of a fused projection (one QKV or gate/up matmul) a tensor reads.

How: the rows are tracked *forward* from the site to the tensor. The site's output carries an index map — an
integer tensor holding, at each output feature, the row of the weight that produced it; dimensions that are not
made of features (batch, sequence: symbolic or not) have size 1 in the map. Every node between the site and the
tensor is replayed on the maps of its inputs that come from the site:

* views (``view``/``reshape``/``unflatten``/``transpose``/``permute``/``unsqueeze``/``squeeze``/``expand``…),
  ``slice``, ``select``, ``split``/``chunk``/``unbind`` (+ ``getitem``) and ``cat`` are applied to the map itself,
  so per-head interleaving (BLOOM, GPT-NeoX: ``view(b, s, heads, 3·d)`` then a split of the last dimension) gives
  row *index sets* and a no-op ``slice(x, 0, 0, INT64_MAX)`` (GPTBigCode) changes nothing;
* point-wise ops (``torch.Tag.pointwise``: rotary's ``q·cos + rotate_half(q)·sin``, casts, activations) join the
  maps of their operands from the site (an element then reads every row either operand's element read: the map
  keeps up to :data:`_MAX_JOIN` candidate rows per element, ``-1`` padding);
* any other op reading the site (a norm, a softmax, a reshape that merges a batch dimension into features) keeps
  only the *set* of rows read, no longer their positions; a position-dependent op after that gives no slice;
* a weight product or an attention op ends the walk (its output mixes every row): no slice.

The answer is the set of rows the tensor reads, as sorted disjoint ranges; :func:`slice_of` returns one range
``(start, end)`` when it is contiguous, else a tuple of ranges (an index set), and ``None`` when the tensor reads
every row or the rows cannot be followed.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from ._graph import PRODUCTS, SOFTMAX, is_tensor

__all__ = ["slice_of", "rows_read", "as_slice", "selects_rows"]

aten = torch.ops.aten

#: candidate rows kept per element across point-wise joins (rotary joins two); beyond that the positions are dropped
_MAX_JOIN = 8
#: nodes visited forward from a site before giving up
_MAX_NODES = 1024

_VIEW_LIKE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int,
              aten.flatten.using_ints}
_SAME = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
         aten.lift_fresh_copy.default, aten.dropout.default, aten.native_dropout.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
           aten.tensor_split.sections, aten.split.sizes}
_SELECTS = {aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.index.Tensor, aten.index_select.default,
            aten.gather.default}
_STOPS = PRODUCTS | SOFTMAX | {aten.scaled_dot_product_attention.default}


class _Set:
    """Rows read, positions unknown."""

    __slots__ = ("rows",)

    def __init__(self, rows: torch.Tensor):
        self.rows = torch.unique(rows[rows >= 0])


def slice_of(operand: Any, site: fx.Node):
    """Output rows of ``site`` that ``operand`` reads when they are not all of them: ``(start, end)``, or a tuple
    of such ranges for an index set (rows interleaved per head); None when every row is read or the rows cannot be
    followed (see the module docstring)."""
    return as_slice(rows_read(operand, site), _out_features(site))


def as_slice(rows: torch.Tensor | None, out: int | None):
    """Sorted rows as a ``Site.slices`` value: ``(start, end)``, a tuple of ranges, or None (no rows, or all)."""
    if rows is None or out is None or rows.numel() == 0 or rows.numel() == out:
        return None
    ranges = _ranges(rows.tolist())
    return ranges[0] if len(ranges) == 1 else tuple(ranges)


def rows_read(operand: Any, site: fx.Node) -> torch.Tensor | None:
    """The sorted rows of ``site``'s output that ``operand`` reads, or None (not derived from ``site``, or lost)."""
    if not isinstance(operand, fx.Node):
        return None
    out = _out_features(site)
    if out is None:
        return None
    region = _region(site, operand)
    if operand not in region:
        return None
    rank = site.meta["val"].dim()
    fdim = 1 if site.op == "call_function" and "conv" in str(site.target) else rank - 1
    shape = [1] * rank
    shape[fdim] = out
    maps: dict[fx.Node, Any] = {site: torch.arange(out).view(1, *shape)}
    for node in sorted(region - {site}):
        if node not in region:
            continue
        maps[node] = _step(node, maps)
        if maps[node] is None and node is operand:
            return None
        if node is operand:
            break
    m = maps.get(operand)
    if m is None:
        return None
    rows = m.rows if isinstance(m, _Set) else torch.unique(m[m >= 0])
    return rows


def selects_rows(operand: Any, site: fx.Node) -> bool:
    """Whether an op that can drop rows (a slice, select, split, index) lies between ``site`` and ``operand``: a
    cheap test before :func:`rows_read`, which otherwise can only answer "all rows" (or None)."""
    if not isinstance(operand, fx.Node):
        return False
    return any(n.op == "call_function" and (n.target in _SPLITS or n.target in _SELECTS)
               for n in _region(site, operand))


def _out_features(site: fx.Node) -> int | None:
    v = site.meta.get("val")
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return None
    d = v.shape[1 if "conv" in str(site.target) else -1]
    return d if isinstance(d, int) else None


def _region(site: fx.Node, operand: fx.Node) -> set[fx.Node]:
    """Nodes forward of ``site`` (not past products or attention) that lie behind ``operand``, ``site`` included."""
    fwd, todo = {site}, [site]
    while todo and len(fwd) < _MAX_NODES:
        n = todo.pop()
        if n is operand:
            continue
        for u in n.users:
            if u not in fwd and u.op in ("call_function", "call_module") and is_tensor(u) and \
                    (u is operand or u.target not in _STOPS):      # sizes read off a tensor carry no rows
                fwd.add(u)
                todo.append(u)
    if operand not in fwd:
        return set()
    back, todo = {operand}, [operand]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in fwd and a not in back:
                back.add(a)
                todo.append(a)
    return back


def _ranges(rows: list[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return [(s, e) for s, e in out]


def _shape(node: fx.Node) -> list | None:
    v = node.meta.get("val")
    return list(v.shape) if isinstance(v, torch.Tensor) else None


# --------------------------------------------------------------------------------------- one node's map
def _step(node: fx.Node, maps: dict) -> Any:
    """The map (tensor ``[k, *dims]``), a :class:`_Set`, a list of maps (a split), or None (lost) of ``node``."""
    if node.target in _STOPS:
        return None
    ins = [maps[a] for a in node.all_input_nodes if a in maps]
    if any(m is None for m in ins) or not ins:
        return None
    if node.op == "call_module":
        if "adapter" in node.meta.get("peftfx", {}) and len(node.args) > 1 and node.args[1] in maps:
            return maps[node.args[1]]          # an output adapter m(x, y) keeps y's rows
        return _as_set(ins)
    if node.target is operator.getitem:
        src = maps.get(node.args[0])
        return src[node.args[1]] if isinstance(src, list) else (src if isinstance(src, _Set) else None)
    if any(isinstance(m, list) for m in ins):
        return None
    if any(isinstance(m, _Set) for m in ins):
        return _as_set(ins) if node.target not in _SPLITS else [_as_set(ins)] * _n_pieces(node)
    x = maps.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    try:
        out = _apply(node, x, maps)
    except (IndexError, RuntimeError, TypeError, ValueError):
        out = _NOT_MAPPED
    if out is _NOT_MAPPED:
        return _as_set(ins) if node.target not in _SPLITS else None
    return out


_NOT_MAPPED = object()


def _as_set(ins: list) -> _Set:
    return _Set(torch.cat([(m.rows if isinstance(m, _Set) else m.flatten()) for m in ins]))


def _n_pieces(node: fx.Node) -> int:
    v = node.meta.get("val")
    return len(v) if isinstance(v, (list, tuple)) else 1


def _apply(node: fx.Node, x: torch.Tensor | None, maps: dict) -> Any:
    """Replay ``node`` on the map ``x`` of its first operand (``[k, *dims]``; dimension ``d`` of the tensor is
    ``d + 1`` of the map)."""
    t, a = node.target, node.args
    out_shape = _shape(node)
    if t is aten.cat.default:
        return _cat(node, maps)
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
        return _join(node, maps, out_shape)
    if x is None:
        return _NOT_MAPPED
    if t in _SAME or t in (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default):
        return x
    nd = x.dim() - 1
    if t in (aten.transpose.int, aten.swapaxes.default):
        return x.transpose(a[1] % nd + 1, a[2] % nd + 1)
    if t in (aten.t.default, aten.numpy_T.default):
        return x.transpose(-1, -2) if nd == 2 else x
    if t is aten.permute.default:
        return x.permute(0, *[d % nd + 1 for d in a[1]])
    if t is aten.unsqueeze.default:
        return x.unsqueeze(a[1] % (nd + 1) + 1)
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        dims = [a[1]] if t is aten.squeeze.dim else list(a[1])
        for d in sorted({d % nd for d in dims if _one(_real(node.args[0], d % nd))}, reverse=True):
            x = x.squeeze(d + 1)
        return x
    if t is aten.expand.default:
        sizes = [s if isinstance(s, int) and s != -1 else 1 for s in a[1]]
        x = x.view(x.shape[0], *([1] * (len(sizes) - nd)), *x.shape[1:])
        return x.expand(x.shape[0], *[s if x.shape[i + 1] == 1 else x.shape[i + 1] for i, s in enumerate(sizes)])
    if t in _VIEW_LIKE:
        return _reshape(x, _shape(node.args[0]), out_shape)
    if t in (aten.slice.Tensor, aten.select.int):
        return _index(node, x)
    if t in _SPLITS:
        return _split(node, x)
    return _NOT_MAPPED


def _index(node: fx.Node, x: torch.Tensor) -> Any:
    """``slice(x, dim, start, end, step)`` / ``select(x, dim, i)`` on the map; along a dimension that is not made
    of features (size 1 in the map) every element keeps its rows."""
    a, nd = node.args, x.dim() - 1
    dim = (a[1] if len(a) > 1 else 0) % nd + 1
    along_features = not (x.shape[dim] == 1 and not _one(_real(node.args[0], dim - 1)))
    if node.target is aten.select.int:
        i = a[2] if along_features else 0
        return x.select(dim, i) if isinstance(i, int) else _NOT_MAPPED
    if not along_features:
        return x
    start, end = (a[2] if len(a) > 2 else None), (a[3] if len(a) > 3 else None)
    step = a[4] if len(a) > 4 else 1
    if not all(v is None or isinstance(v, int) for v in (start, end, step)):
        return _NOT_MAPPED
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


def _one(size: Any) -> bool:
    """Whether a dimension is known to be 1 (a symbolic size is compared with nothing: no guard is added)."""
    return isinstance(size, int) and size == 1


def _real(node: fx.Node, dim: int) -> Any:
    s = _shape(node)
    return None if s is None else s[dim]


def _split(node: fx.Node, x: torch.Tensor) -> list | None:
    t, a = node.target, node.args
    nd = x.dim() - 1
    dim = (a[2] if len(a) > 2 else 0) if t is not aten.unbind.int else (a[1] if len(a) > 1 else 0)
    d = dim % nd + 1
    n_out = _n_pieces(node)
    if x.shape[d] == 1 and not _one(_real(node.args[0], d - 1)):
        return [x] * n_out                     # split along batch/sequence: every piece reads the same rows
    if t is aten.unbind.int:
        return list(x.unbind(d))
    if t is aten.chunk.default:
        return list(x.chunk(a[1], d))
    if t is aten.tensor_split.sections:
        return list(x.tensor_split(a[1], d))
    if not (isinstance(a[1], int) or all(isinstance(v, int) for v in a[1])):
        return None
    return list(x.split(a[1], d))


def _cat(node: fx.Node, maps: dict) -> Any:
    """``cat`` along a dimension: pieces not from the site read no row (-1) when the dimension holds features."""
    tensors, dim = node.args[0], (node.args[1] if len(node.args) > 1 else 0)
    out_shape = _shape(node)
    if out_shape is None:
        return _NOT_MAPPED
    nd = len(out_shape)
    d = dim % nd + 1
    pieces = [maps.get(p) for p in tensors]
    mapped = [p for p in pieces if p is not None]
    k = max(p.shape[0] for p in mapped)
    rank = max(p.dim() for p in mapped)
    if any(p.dim() != rank for p in mapped):
        return _NOT_MAPPED
    if all(p.shape[d] == 1 and not _one(_real(n, d - 1)) for p, n in zip(pieces, tensors) if p is not None):
        return _join(node, maps, out_shape, along=None)   # along batch/sequence (a KV cache): rows of every piece
    parts = []
    for p, n in zip(pieces, tensors):
        if p is None:
            size = _real(n, d - 1)
            if not isinstance(size, int):
                return _NOT_MAPPED
            shape = list(mapped[0].shape)
            shape[0], shape[d] = k, size
            p = torch.full(shape, -1, dtype=torch.long)
        parts.append(_pad_k(p, k))
    shapes = [list(p.shape[:d]) + list(p.shape[d + 1:]) for p in parts]
    target = [max(s) for s in zip(*shapes)]
    parts = [p.expand(*target[:d], p.shape[d], *target[d:]) for p in parts]
    return torch.cat(parts, d)


def _pad_k(m: torch.Tensor, k: int) -> torch.Tensor:
    if m.shape[0] == k:
        return m
    return torch.cat([m, torch.full((k - m.shape[0], *m.shape[1:]), -1, dtype=m.dtype)], 0)


def _join(node: fx.Node, maps: dict, out_shape: list | None, along: Any = ...) -> Any:
    """Point-wise op (or ``cat`` along a non-feature dimension): each element reads the rows of the elements it
    combines; the maps broadcast to the output's rank and are stacked along the candidate dimension."""
    if out_shape is None:
        return _NOT_MAPPED
    ms = [maps[a] for a in node.all_input_nodes if a in maps]
    nd = len(out_shape)
    full = []
    for m in ms:
        m = m.view(m.shape[0], *([1] * (nd + 1 - m.dim())), *m.shape[1:])
        if m.dim() != nd + 1:
            return _NOT_MAPPED
        for i, s in enumerate(m.shape[1:]):
            if s != 1 and not (isinstance(out_shape[i], int) and out_shape[i] == s):
                return _NOT_MAPPED             # a reduction or broadcast over features: positions are lost
        full.append(m)
    target = [max(m.shape[i + 1] for m in full) for i in range(nd)]
    full = [m.expand(m.shape[0], *target) for m in full]
    # the same map twice (x * x, x + x) adds no candidate
    uniq = []
    for m in full:
        if not any(torch.equal(m, u) for u in uniq):
            uniq.append(m)
    out = torch.cat(uniq, 0)
    if out.shape[0] > _MAX_JOIN:
        return _NOT_MAPPED
    return out


def _reshape(x: torch.Tensor, in_shape: list | None, out_shape: list | None) -> Any:
    """A view/reshape on the map: valid when every dimension that is not made of features (size 1 in the map,
    not 1 in the tensor) comes before every feature dimension; the features then re-split in C order."""
    if in_shape is None or out_shape is None or len(in_shape) != x.dim() - 1:
        return _NOT_MAPPED
    dims = list(x.shape[1:])
    broadcast = [i for i, (m, r) in enumerate(zip(dims, in_shape)) if m == 1 and not _one(r)]
    feature = [i for i, m in enumerate(dims) if m > 1]
    if broadcast and feature and max(broadcast) > min(feature):
        return _NOT_MAPPED
    n = 1
    for m in dims:
        n *= m
    target, prod = [], 1
    for s in reversed(out_shape):
        if prod == n:
            target.append(1)
        elif isinstance(s, int):
            prod *= s
            target.append(s)
            if prod > n:
                return _NOT_MAPPED
        else:
            return _NOT_MAPPED
    if prod != n:
        return _NOT_MAPPED
    return x.reshape(x.shape[0], *reversed(target))
