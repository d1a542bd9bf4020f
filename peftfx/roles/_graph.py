"""Graph helpers shared by the role detectors: the tensor data-flow graph, bounded walks, reachability between
sites, the attention ops of a graph and the weight products that are not sites."""
from __future__ import annotations

import operator
from collections import deque
from typing import Any, Callable

import networkx as nx
import torch
from torch import fx

__all__ = ["dataflow_graph", "attention_nodes", "is_tensor", "walk_back", "walk_single", "reach", "weight_ops",
           "VIEWS"]

aten = torch.ops.aten

SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
BATCH_MM = {aten.matmul.default, aten.bmm.default, aten.einsum.default}
SCORES = BATCH_MM | {aten.baddbmm.default}
#: products of an activation with a weight (a site when peftfx can adapt it, a wall for role walks otherwise)
PRODUCTS = SCORES | {aten.mm.default, aten.addmm.default, aten.linear.default, aten.convolution.default,
                     aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
                     aten.conv2d.padding, aten.conv3d.padding, aten.conv_transpose1d.default,
                     aten.conv_transpose2d.input, aten.conv_transpose3d.input}
#: pieces of a parameter that are still weights (nn.MultiheadAttention's in_proj_weight split for cross-attention)
_PIECES = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor, aten.select.int,
           aten.unbind.int, operator.getitem}
#: ops that move or re-shape a tensor without mixing its features
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
         aten.permute.default, aten.contiguous.default, aten.clone.default, aten.expand.default,
         aten.unsqueeze.default, aten.squeeze.dim, aten.t.default, aten.alias.default}

#: (attention node, q, k, v, output node)
Attention = tuple[fx.Node, Any, Any, Any, fx.Node]


def is_tensor(node: fx.Node) -> bool:
    """Whether ``node`` produces a tensor (or a list/tuple holding one), per its ``meta["val"]``."""
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
            if is_tensor(inp) or inp.op in ("get_attr", "call_module"):
                g.add_edge(inp, node)
    return g


def attention_nodes(graph: fx.Graph) -> list[Attention]:
    """(attention node, q, k, v, output) for every attention in the graph: ``scaled_dot_product_attention``, or
    the eager pattern scores (matmul/bmm/baddbmm) → softmax → matmul/bmm."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.scaled_dot_product_attention.default:
            q, k, v = node.args[:3]
            found.append((node, q, k, v, node))
        elif node.target in SOFTMAX:
            eager = _eager_attention(node)
            if eager is not None:
                found.append(eager)
    return found


def _eager_attention(softmax: fx.Node) -> Attention | None:
    scores = walk_back(softmax.args[0], lambda n: n.target in SCORES, limit=6)
    probs_user = _probs_times_v(softmax)
    if scores is None or probs_user is None or scores.target is aten.einsum.default:
        return None
    # baddbmm(bias, q, kᵀ): scores with an additive bias fused in (BLOOM's ALiBi)
    q, kt = scores.args[1:3] if scores.target is aten.baddbmm.default else scores.args[:2]
    v = probs_user.args[1]
    return (softmax, q, kt, v, probs_user)


def _probs_times_v(softmax: fx.Node, limit: int = 5) -> fx.Node | None:
    """The one batched matmul, within ``limit`` steps, that takes the probabilities (through dropout, casts, a head
    mask, views) as its first operand. The probabilities may also leave the block on the way (``nn.MultiheadAttention`` with
    ``need_weights`` returns them, after dropout in training), so forks are followed, not refused."""
    hits, frontier, seen = set(), [softmax], {softmax}
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u.op not in ("call_function", "call_module"):
                    continue
                seen.add(u)
                if u.target in BATCH_MM:
                    if u.args and u.args[0] is n:
                        hits.add(u)
                elif is_tensor(u):
                    nxt.append(u)
        frontier = nxt
    return hits.pop() if len(hits) == 1 else None


def walk_back(start: Any, pred: Callable[[fx.Node], bool], limit: int) -> fx.Node | None:
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
                if a not in seen and is_tensor(a):
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return None


def walk_single(start: Any, pred: Callable[[fx.Node], bool], limit: int, forward: bool) -> fx.Node | None:
    """Follow a chain of single users (``forward``) or single tensor inputs from ``start`` to the first node
    satisfying ``pred``; None if the chain forks, ends, or runs past ``limit`` steps."""
    node = start
    for _ in range(limit):
        if not isinstance(node, fx.Node):
            return None
        if pred(node):
            return node
        nxt = list(node.users) if forward else [a for a in node.all_input_nodes if is_tensor(a)]
        if len(nxt) != 1:
            return None
        node = nxt[0]
    return None


def reach(g: nx.DiGraph, start: fx.Node, stop: set[fx.Node], forward: bool,
          blocked: set[fx.Node] = frozenset()) -> set[fx.Node]:
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


def weight_ops(graph: fx.Graph) -> set[fx.Node]:
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
        if n.op == "call_function" and n.target in _PIECES:
            return is_weight(n.args[0] if n.args else None)
        return n.op == "call_function" and n.target in VIEWS and is_weight(n.args[0] if n.args else None) \
            and len(n.users) == 1
    out = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target in PRODUCTS and any(is_weight(a) for a in node.all_input_nodes):
            out.add(node)
    return out
