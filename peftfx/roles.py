"""Structural roles of sites, read off the data flow of the graph (networkx), never from name tables.

Roles: ``attn.q``, ``attn.k``, ``attn.v`` (a fused projection carries all three plus ``attn.qkv`` and the
output rows of each slice), ``attn.o``, ``mlp.up``, ``mlp.gate``, ``mlp.down``, ``embed`` (token
embedding), ``embed.position``, ``embed.aux``, ``head`` (the last projection before an output).

How: an attention op is ``scaled_dot_product_attention`` or the eager pattern matmul → softmax → matmul.
Walking back from its q/k/v operands (through views, rotary, splits) to the first weight matmul gives
q/k/v; walking forward from its output to the first weight matmul gives o. An MLP is a site whose output
reaches another site through a nonlinearity, where that second site's output joins the residual stream
(an add with an ancestor of the first site's input): up (and gate, the branch that went through the
nonlinearity when two branches are multiplied), then down.
"""
from __future__ import annotations

import operator
from collections import deque
from typing import Iterable

import networkx as nx
import torch
from torch import fx

from .sites import Site

__all__ = ["assign_roles", "ROLES", "dataflow_graph", "attention_nodes"]

aten = torch.ops.aten

ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.up", "mlp.gate", "mlp.down",
         "embed", "embed.position", "embed.aux", "head")

_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
_BATCH_MM = {aten.matmul.default, aten.bmm.default, aten.einsum.default}
_SCORES = _BATCH_MM | {aten.baddbmm.default}
_ACTIVATIONS = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default,
                aten.sigmoid.default, aten.elu.default, aten.leaky_relu.default, aten.mish.default,
                aten.hardswish.default, aten.softplus.default, aten.pow.Tensor_Scalar, aten.relu6.default,
                aten.gelu_.default if hasattr(aten, "gelu_") else aten.gelu.default, aten.silu_.default,
                aten.relu_.default}
_ADDS = {aten.add.Tensor, aten.add_.Tensor}


def _is_tensor(node: fx.Node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, (list, tuple)):
        return any(isinstance(t, torch.Tensor) for t in v)
    return isinstance(v, torch.Tensor)


def dataflow_graph(graph: fx.Graph) -> nx.DiGraph:
    """Tensor data flow: an edge u → v when tensor u is an input of v (shape-only SymInt edges dropped)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        inputs = node.all_input_nodes
        if node.op == "call_module" and "adapter" in node.meta.get("peftfx", {}) and len(node.args) > 1:
            # an output adapter m(x, y) belongs to its site: data flows y → m; x → m is no new path
            inputs = [i for i in inputs if i is not node.args[0] or i is node.args[1]]
        for inp in inputs:
            if _is_tensor(inp) or inp.op in ("get_attr", "call_module"):
                g.add_edge(inp, node)
    return g


def attention_nodes(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(attention node, q, k, v, output) for every attention in the graph."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.scaled_dot_product_attention.default:
            q, k, v = node.args[:3]
            found.append((node, q, k, v, node))
        elif node.target in _SOFTMAX:
            eager = _eager_attention(node)
            if eager is not None:
                found.append(eager)
    return found


def _eager_attention(softmax: fx.Node):
    scores = _walk_back(softmax.args[0], lambda n: n.target in _SCORES, limit=6)
    probs_user = _walk_single(softmax, lambda n: n.target in _BATCH_MM, limit=6, forward=True)
    if scores is None or probs_user is None or scores.target is aten.einsum.default:
        return None
    # baddbmm(bias, q, kᵀ): scores with an additive bias fused in (BLOOM's ALiBi)
    q, kt = scores.args[1:3] if scores.target is aten.baddbmm.default else scores.args[:2]
    v = probs_user.args[1]
    return (softmax, q, kt, v, probs_user)


def _walk_back(start, pred, limit: int):
    """The nearest node before ``start`` (within ``limit`` steps over tensor inputs) that satisfies ``pred``;
    None if there is none or two at the same distance. Crosses element-wise joins such as ``scores + mask``."""
    frontier, seen = [start], set()
    for _ in range(limit):
        hits = [n for n in frontier if isinstance(n, fx.Node) and pred(n)]
        if hits:
            return hits[0] if len(hits) == 1 else None
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n.op != "call_function":
                continue
            for a in n.all_input_nodes:
                if a not in seen and _is_tensor(a):
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return None


def _walk_single(start, pred, limit: int, forward: bool):
    node = start
    for _ in range(limit):
        if not isinstance(node, fx.Node):
            return None
        if pred(node):
            return node
        nxt = list(node.users) if forward else [a for a in node.all_input_nodes if _is_tensor(a)]
        if len(nxt) != 1:
            return None
        node = nxt[0]
    return None


def _reach(g: nx.DiGraph, start: fx.Node, stop: set[fx.Node], forward: bool, blocked: set[fx.Node] = frozenset()):
    """Sites first reached from ``start`` (not crossing another site or a blocked node)."""
    hits, seen, todo = set(), {start}, deque([start])
    step = g.successors if forward else g.predecessors
    while todo:
        n = todo.popleft()
        for m in step(n):
            if m in seen or m in blocked:
                continue
            seen.add(m)
            if m in stop:
                hits.add(m)
            elif m.op not in ("placeholder", "get_attr", "output"):
                todo.append(m)
    return hits


def assign_roles(graph: fx.Graph, sites: Iterable[Site]) -> None:
    """Fill ``site.roles`` (and ``site.slices`` for fused projections) in place."""
    sites = list(sites)
    by_node = {s.node: s for s in sites}
    stop = set(by_node)
    g = dataflow_graph(graph)
    attn = attention_nodes(graph)
    # Walks never cross an attention op, nor a weight op that is not a site (an op peftfx cannot adapt, e.g. a
    # convolution): a projection found beyond one would belong to another block.
    blocked = {a[0] for a in attn} | {a[4] for a in attn} | (_weight_ops(graph) - stop)
    for node, q, k, v, out in attn:
        layer = node.meta.get("peftfx", {}).get("layer")
        hits = {}
        for role, operand in (("attn.q", q), ("attn.k", k), ("attn.v", v)):
            if not isinstance(operand, fx.Node):
                continue
            if operand in stop:
                found = {by_node[operand]}
            else:
                found = {by_node[n] for n in _reach(g, operand, stop, False, blocked)}
            # an embedding table is never a projection of the attention's inputs
            found = {s for s in found if s.kind != "embedding" and (layer is None or s.layer in (None, layer))}
            hits[role] = found
            for s in found:
                s.roles.add(role)
        for role, operand in (("attn.q", q), ("attn.k", k), ("attn.v", v)):
            for s in hits.get(role, ()):
                if sum(s in h for h in hits.values()) > 1:
                    s.roles.add("attn.qkv")
                    span = _slice_of(operand, s.node)
                    if span is not None:
                        s.slices[role] = span
        for n in _reach(g, out, stop, True, blocked):
            s = by_node[n]
            if s.kind != "embedding" and (layer is None or s.layer in (None, layer)):
                s.roles.add("attn.o")
    _mlp_roles(g, sites, by_node, stop, blocked)
    _embedding_roles(graph, g, sites)
    _head_roles(g, sites, stop)


def _weight_ops(graph: fx.Graph) -> set[fx.Node]:
    """Products (matmuls, convolutions) with a parameter of two or more dimensions, read directly or through
    views/transposes."""
    def is_weight(n) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if n.op == "get_attr":
            v = n.meta.get("val")
            if v is None:
                try:
                    v = graph.owning_module.get_parameter(n.target)
                except AttributeError:
                    return False
            return isinstance(v, torch.Tensor) and v.dim() >= 2 and v.is_floating_point()
        return n.op == "call_function" and n.target in _VIEWS and is_weight(n.args[0] if n.args else None) \
            and len(n.users) == 1
    out = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _PRODUCTS and any(is_weight(a) for a in node.all_input_nodes):
            out.add(node)
    return out


_PRODUCTS = _SCORES | {aten.mm.default, aten.addmm.default, aten.linear.default, aten.convolution.default,
                       aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}


def _mlp_roles(g, sites, by_node, stop, blocked) -> None:
    attn_roles = {"attn.q", "attn.k", "attn.v", "attn.o"}
    free = [s for s in sites if s.kind != "embedding" and not (s.roles & attn_roles)]
    producers: dict[Site, list[tuple[Site, bool]]] = {}
    for s in free:
        for d, via_act in _reach_with_activation(g, s.node, stop, blocked):
            producers.setdefault(by_node[d], []).append((s, via_act))
    for down, prods in producers.items():
        if down.roles & attn_roles or not any(act for _, act in prods):
            continue
        if not _joins_residual(g, down, [p.input for p, _ in prods], stop):
            continue
        down.roles.add("mlp.down")
        with_act = [p for p, act in prods if act]
        without = [p for p, act in prods if not act]
        if without:
            for p in without:
                p.roles.add("mlp.up")
            for p in with_act:
                p.roles.add("mlp.gate")
        else:
            for p in with_act:
                p.roles.add("mlp.up")


def _reach_with_activation(g, start, stop, blocked):
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


def _joins_residual(g, down: Site, inputs: list[fx.Node], stop, depth: int = 8) -> bool:
    frontier, seen = [down.node], {down.node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for m in g.successors(n):
                if m in seen or m in stop:
                    continue
                seen.add(m)
                if m.op == "call_function" and m.target in _ADDS:
                    others = [a for a in m.all_input_nodes if a is not n]
                    for o in others:
                        if any(o is x or nx.has_path(g, o, x) for x in inputs):
                            return True
                nxt.append(m)
        frontier = nxt
    return False


def _embedding_roles(graph, g, sites) -> None:
    ints = [n for n in graph.nodes if n.op == "placeholder" and _is_tensor(n)
            and not n.meta["val"].is_floating_point()]
    fed = []
    for s in sites:
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


def _head_roles(g, sites, stop) -> None:
    outputs = [n for n in g.nodes if n.op == "output"]
    for s in sites:
        if s.roles or s.kind == "embedding":
            continue
        if any(o in _reach(g, s.node, stop | set(outputs), True) for o in outputs):
            s.roles.add("head")


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.contiguous.default, aten.clone.default, aten.expand.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.t.default, aten.alias.default}


def _slice_of(operand: fx.Node, site: fx.Node) -> tuple[int, int] | None:
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
            x, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
            start, end = (node.args[2] if len(node.args) > 2 else 0), node.args[3] if len(node.args) > 3 else None
            width = _feature_width(x, dim)
            if width is None or end is None:
                return None
            piece = (start * width, min(end, x.meta["val"].shape[dim]) * width)
            span = piece if span is None else (piece[0] + span[0], piece[0] + span[1])
            node = x
            continue
        inputs = [a for a in node.all_input_nodes if _is_tensor(a)]
        if node.target not in _VIEWS and len(inputs) != 1:
            # rotary and similar: follow the operand that leads to the site
            inputs = [a for a in inputs if _leads_to(a, site)]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


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
