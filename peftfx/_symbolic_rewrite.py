"""The rewrite of the static-then-symbolic trace (:mod:`peftfx.trace_symbolic`): every graph integer that is a
size expression becomes ``aten.sym_size.int`` nodes of the inputs (and products of them), torch.export's guards
of the static shapes go, every node's ``meta["val"]`` is made symbolic, and the output shapes the rewrite implies
at other sizes are read off the graph."""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ._symbolic_sizes import _SMALL_K, _classify, _expressions, _Fallback


def _rewrite(gm: fx.GraphModule, sizes, groups, leaves, consts) -> int:
    """Replace every integer argument that is a size expression by ``sym_size`` nodes; returns how many."""
    graph = gm.graph
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(holders) != len(leaves):
        raise _Fallback(f"{len(holders)} graph inputs for {len(leaves)} input leaves")
    monomials, ks = _expressions(sizes, consts)
    cursor = holders[-1] if holders else next(iter(graph.nodes))
    made: dict[Any, fx.Node] = {}

    def insert(target, args):
        nonlocal cursor
        with graph.inserting_after(cursor):
            cursor = graph.call_function(target, args)
        return cursor

    def node_for(k, mono):
        key = (k, mono)
        if key in made:
            return made[key]
        factors = []
        for g, p in mono:
            if (g, 1) not in made:
                i, d = groups[g][0]
                made[(g, 1)] = insert(torch.ops.aten.sym_size.int, (holders[i], d))
            factors += [made[(g, 1)]] * p
        out = factors[0]
        for f in factors[1:]:
            out = insert(operator.mul, (out, f))
        if k != 1:
            out = insert(operator.mul, (k, out))
        made[key] = out
        return out

    count = 0

    def sub(a):
        nonlocal count
        if type(a) is int:
            hit = _classify(a, monomials, ks, consts)
            if hit is not None:
                count += 1
                return node_for(1, hit[1]) if hit[0] == 1 else node_for(*hit)
        return a

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is torch.ops.aten.sym_size.int or node in made.values():
            continue
        node.args = fx.node.map_aggregate(node.args, sub)
        node.kwargs = fx.node.map_aggregate(node.kwargs, sub)
    return count


def _drop_guards(gm: fx.GraphModule) -> None:
    """torch.export's input guards of the static shapes (``_guards_fn``) go; the cleanup pass would drop them too."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


def _remark(gm: fx.GraphModule, leaves, groups, sizes, consts) -> None:
    """Every node's ``meta["val"]`` made symbolic, as the dynamic export would give it: one fake mode whose shape
    environment holds a symbol per group (the inputs' dynamic sizes); each size or stride of a static value that is
    a size expression becomes that expression of the symbols. (A full fake-tensor propagation of the graph would
    cost as much as the export it replaces.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    dyn: dict[int, set[int]] = {}
    for occ in groups.values():
        for i, d in occ:
            dyn.setdefault(i, set()).add(d)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    syms: dict[Any, Any] = {}
    for i, (v, _) in enumerate(leaves):
        if isinstance(v, torch.Tensor):
            ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DUCK if d in dyn.get(i, ()) else
                                                          DimDynamic.STATIC for d in range(v.dim())])
            holders[i].meta["val"] = fake = mode.from_tensor(v, symbolic_context=ctx)
            for g, occ in groups.items():
                for j, d in occ:
                    if j == i:
                        syms.setdefault(g, fake.shape[d])
    if any(not isinstance(syms.get(g), torch.SymInt) for g in groups):
        raise _Fallback("the traced sizes did not become one symbol per dynamic size")
    monomials, ks = _expressions(sizes, consts)
    memo: dict[int, Any] = {}

    def sym(c: int) -> Any:
        if c not in memo:
            hit = _classify(c, monomials, ks, consts) if c > _SMALL_K else None
            out: Any = c
            if hit is not None:
                out = hit[0]
                for g, p in hit[1]:
                    for _ in range(p):
                        out = out * syms[g]
            memo[c] = out
        return memo[c]

    made: dict[tuple, torch.Tensor] = {}

    def remake(v: Any) -> Any:
        if isinstance(v, torch.Tensor):     # one fake value per (shape, stride, dtype, device): 32 layers share
            key = (tuple(v.shape), v.stride(), v.dtype, v.device, v.requires_grad)
            if key not in made:
                with mode:
                    made[key] = torch.empty_strided([sym(int(d)) for d in v.shape],
                                                    [sym(int(d)) for d in v.stride()], dtype=v.dtype,
                                                    device=v.device, requires_grad=v.requires_grad)
            return made[key]
        if isinstance(v, (list, tuple)):
            return type(v)(remake(x) for x in v)
        return v

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int:
            node.meta["val"] = syms[next(g for g, occ in groups.items()
                                         if (holders.index(node.args[0]), node.args[1]) in occ)]
        elif node.op == "call_function" and node.target is operator.mul and node.meta.get("val") is None:
            a, b = (x.meta["val"] if isinstance(x, fx.Node) else x for x in node.args)
            node.meta["val"] = a * b
        elif "val" in node.meta:
            try:
                node.meta["val"] = remake(node.meta["val"])
            except Exception as e:   # a value the fake mode cannot rebuild (a sparse or quantized tensor)
                raise _Fallback(f"node {node.name}'s value could not be made symbolic ({type(e).__name__})") from e


def _predicted(gm: fx.GraphModule, sizes, check, consts) -> list[tuple]:
    """The shapes of the graph's tensor outputs at the ``check`` sizes, as the rewrite reads the traced ones."""
    monomials, ks = _expressions(sizes, consts)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    shapes = []
    for node in pytree.tree_leaves(out.args):
        v = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(v, torch.Tensor):
            continue
        dims = []
        for d in v.shape:
            hit = _classify(int(d), monomials, ks, consts) if int(d) > _SMALL_K else None
            if hit is not None:
                d = hit[0]
                for g, p in hit[1]:
                    d *= check[g] ** p
            dims.append(int(d))
        shapes.append(tuple(dims))
    return shapes
