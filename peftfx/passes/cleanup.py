"""Remove what ``torch.export`` adds for its own checks and that would pin the graph to the example
inputs or the trace device: the input-guard module, tensor-metadata asserts (dtype/device checks).

:func:`simplify_pass` goes further for graphs that run many times on small inputs (a generation step): it removes
operations whose result equals one of their inputs and the code left dead by that, so each call dispatches fewer
ATen ops and copies no tensor it need not copy.
"""
from __future__ import annotations

import operator
import sys

import torch
from torch import fx

from .base import PassResult, graph_pass

__all__ = ["cleanup_pass", "droppable", "simplify_pass"]

_DROP = {torch.ops.aten._assert_tensor_metadata.default}

aten = torch.ops.aten


def droppable(node: fx.Node) -> bool:
    """What the cleanup pass removes from a traced graph: torch.export's input guards and metadata asserts, unused."""
    guard = node.op == "call_module" and node.target == "_guards_fn"
    return not node.users and (guard or (node.op == "call_function" and node.target in _DROP))


@graph_pass("cleanup")
def cleanup_pass(gm: fx.GraphModule) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        if droppable(node):
            gm.graph.erase_node(node)
            modified = True
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    return PassResult(gm, modified)


@graph_pass("simplify")
def simplify_pass(gm: fx.GraphModule) -> PassResult:
    """Value-preserving simplifications, each decided from the node's arguments and traced metadata alone:

    - ``cat`` drops operands the trace proved empty (a cache layer's ``torch.tensor([])`` start, lifted as a
      constant): the concatenation of the rest is the same tensor; with one operand left the ``cat`` is that
      operand (no copy of a KV cache each step);
    - ``slice(x, d, 0, INT64_MAX)`` (step 1), ``to(x, dtype)`` to ``x``'s own dtype (and device), ``x * 1`` and
      ``x + 0`` whose result has ``x``'s dtype and shape: ``x``;
    - grouped-query attention: ``scaled_dot_product_attention`` on keys and values whose heads were repeated
      (transformers' ``repeat_kv``: ``unsqueeze(x, 2)`` → ``expand`` to ``[b, h_kv, n, s, d]`` → ``reshape`` to
      ``[b, h_kv·n, s, d]``: query head i reads key/value head i // n) takes ``x`` itself with ``enable_gqa=True``,
      which SDPA defines as that same repetition, without materialising n copies of the cache each step;
    - code left without users (``lift_fresh_copy``/``detach_`` pairs of an unused constant, size arithmetic).

    Replacing a fresh result by its input makes two values one tensor, which only a later in-place op could tell
    apart: a graph that mutates any tensor (beyond the ``detach_`` of its own fresh constant copies) keeps those
    operations. Adapter modules (``call_module``) and random ops are never removed."""
    graph = gm.graph
    aliasing_ok = not any(_mutates(n) and not _fresh_detach(n) for n in graph.nodes)
    modified = _drop_empty_cat_operands(graph, aliasing_ok)
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.users:
            continue
        same = _identity_of(node, aliasing_ok)
        if same is not None:
            node.replace_all_uses_with(same)
            modified = True
    modified |= _grouped_attention(graph)
    modified |= _drop_dead(graph)
    return PassResult(gm, modified)


# ------------------------------------------------------------------------------------------------ rules
def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return bool(schema is not None and schema.is_mutable)


def _fresh_detach(node: fx.Node) -> bool:
    """``detach_`` of a ``lift_fresh_copy`` (torch.export's form of a constant made inside the model): it changes
    only that private copy."""
    return (node.target is aten.detach_.default and isinstance(node.args[0], fx.Node)
            and node.args[0].target is aten.lift_fresh_copy.default)


def _empty_const(node) -> bool:
    v = _val(node)
    return v is not None and v.dim() == 1 and isinstance(v.shape[0], int) and v.shape[0] == 0


def _drop_empty_cat_operands(graph: fx.Graph, aliasing_ok: bool) -> bool:
    modified = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default or not isinstance(node.args[0],
                                                                                             (list, tuple)):
            continue
        out = _val(node)
        keep = [a for a in node.args[0] if not _empty_const(a)]
        if out is None or not keep or len(keep) == len(node.args[0]):
            continue
        if any(_val(a) is None or _val(a).dtype != out.dtype or _val(a).device != out.device for a in keep):
            continue            # the empty operand took part in type promotion: keep it
        if len(keep) == 1 and aliasing_ok and not _input_as_output(node, keep[0]):
            node.replace_all_uses_with(keep[0])
        else:
            node.args = (list(keep), *node.args[1:])
        modified = True
    return modified


def _identity_of(node: fx.Node, aliasing_ok: bool) -> fx.Node | None:
    """The input ``node`` equals (same values, dtype, shape), or None."""
    args, t = node.args, node.target
    x = args[0] if args else None
    out, inp = _val(node), _val(x)
    if out is None or inp is None or out.dtype != inp.dtype or out.device != inp.device or out.layout != inp.layout \
            or out.dim() != inp.dim() or any(not _same_size(a, b) for a, b in zip(out.shape, inp.shape)):
        return None
    if t is aten.slice.Tensor:             # a view of all of x: x itself (views alias anyway)
        full = _arg(node, "start", None) in (None, 0) and _arg(node, "end", None) in (None, sys.maxsize)
        return x if full and _arg(node, "step", 1) == 1 else None
    if t in (aten.to.dtype, aten.to.device, aten.to.dtype_layout):   # a no-op .to() returns x itself
        keep_format = _arg(node, "memory_format", None) in (None, torch.preserve_format)
        return x if keep_format and not _arg(node, "copy", False) else None
    if not aliasing_ok or node.kwargs or _input_as_output(node, x):
        return None
    if t is aten.mul.Tensor and len(args) == 2 and not isinstance(args[1], fx.Node) and args[1] == 1:
        return x
    if t is aten.add.Tensor and len(args) == 2 and not isinstance(args[1], fx.Node) and args[1] == 0:
        return x
    return None


def _input_as_output(node: fx.Node, x: fx.Node) -> bool:
    """Whether replacing ``node`` by ``x`` would return a graph input (or constant) itself as an output: the
    caller then holds its own input, where it had a fresh tensor."""
    return x.op in ("placeholder", "get_attr") and any(u.op == "output" for u in node.users)


def _arg(node: fx.Node, name: str, default):
    """Argument ``name`` of an ATen call, positional or keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    names = [a.name for a in node.target._schema.arguments]
    i = names.index(name) if name in names else len(node.args)
    return node.args[i] if i < len(node.args) else default


def _same_size(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def _grouped_attention(graph: fx.Graph) -> bool:
    modified = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default \
                or node.kwargs.get("enable_gqa") or len(node.args) < 3:
            continue
        q, k, v = node.args[:3]
        rk, rv = _repeated_heads(k), _repeated_heads(v)
        qv = _val(q)
        if rk is None or rv is None or rk[1] != rv[1] or qv is None or qv.dim() != 4 \
                or not _same_size(qv.shape[1], _val(k).shape[1]):
            continue
        node.args = (q, rk[0], rv[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        modified = True
    return modified


def _repeated_heads(node) -> tuple[fx.Node, int] | None:
    """``(x, n)`` when ``node`` is ``x``'s heads each repeated n times in place (``repeat_kv``), else None."""
    out = _val(node)
    if out is None or out.dim() != 4 or node.target not in (aten.reshape.default, aten.view.default,
                                                            aten._unsafe_view.default):
        return None
    exp = node.args[0]
    if not isinstance(exp, fx.Node) or exp.target is not aten.expand.default:
        return None
    uns = exp.args[0]
    if not isinstance(uns, fx.Node) or uns.target is not aten.unsqueeze.default or uns.args[1] != 2:
        return None
    x, big = uns.args[0], _val(exp)
    xv = _val(x)
    if xv is None or big is None or xv.dim() != 4 or big.dim() != 5 or not isinstance(big.shape[2], int):
        return None
    n = big.shape[2]
    same = [(big.shape[0], xv.shape[0]), (big.shape[1], xv.shape[1]), (big.shape[3], xv.shape[2]),
            (big.shape[4], xv.shape[3]), (out.shape[0], xv.shape[0]), (out.shape[2], xv.shape[2]),
            (out.shape[3], xv.shape[3])]
    heads = xv.shape[1] * n
    if n < 1 or not all(_same_size(a, b) for a, b in same) or not _same_size(out.shape[1], heads):
        return None
    return x, n


def _drop_dead(graph: fx.Graph) -> bool:
    """Erase nodes without users that have no effect: pure ATen ops, size arithmetic, ``detach_`` of a fresh
    constant copy, constant reads. Adapter modules and anything impure stay."""
    modified = False
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output", "call_module"):
            continue
        if node.op == "call_function" and not _fresh_detach(node):
            if node.target in (operator.add, operator.sub, operator.mul, operator.floordiv):
                pass
            elif not isinstance(node.target, torch._ops.OpOverload) or node.is_impure():
                continue
        graph.erase_node(node)
        modified = True
    return modified
