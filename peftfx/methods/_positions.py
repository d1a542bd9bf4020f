"""Position ids in a traced graph: find them and shift them by N (prefix tuning's ``position_offset``).

Sources of position ids: ``arange`` nodes, integer buffers holding 0, 1, 2, … along their last dimension (BERT's
``position_ids`` buffer), and a ``position_ids`` graph input. They reach the model two ways, and N is added at
each:

* absolute positions — an embedding lookup whose index operand comes from a source through index-preserving ops
  only (views, slices, expands, ``+ past_length``): GPT-2's ``wpe``, BERT's position embeddings. Token-type lookups
  that merely *gather* through the positions are not index-preserving and are left alone.
* rotary (or any other) positions — data flow from a source to the query and key operands of attention that does
  not pass an embedding lookup. Mask computations often read the same position ids (transformers builds causal and
  packed-sequence masks from them); the shift is put on the first edges that lead only to queries and keys, so the
  masks keep the unshifted ids — they relate the real tokens to each other, which a common shift does not change.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .._util import tensor_val as _val
from ..sites import set_site_input, site_input

__all__ = ["offset_positions", "plan_positions", "position_sources"]

aten = torch.ops.aten

_INDEX_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
              aten.squeeze.dim, aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
              aten.clone.default, aten.contiguous.default, aten.alias.default, aten.to.dtype, aten.to.dtype_layout,
              aten.to.device, aten._to_copy.default, aten.add.Tensor, aten.lift_fresh_copy.default}
_ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}




def _fetch(pm, target: str):
    obj: Any = pm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def position_sources(pm) -> list[fx.Node]:
    """``arange`` nodes, integer buffers holding 0, 1, 2, … along their last dim, a ``position_ids`` input."""
    found = []
    for node in pm.graph.nodes:
        if node.op == "call_function" and node.target in _ARANGE or node.op == "placeholder" and node.target == "position_ids":
            found.append(node)
        elif node.op == "get_attr":
            t = _fetch(pm, node.target)
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() >= 1 and t.shape[-1] > 1 \
                    and t.device.type != "meta" and torch.equal(t.reshape(-1, t.shape[-1])[0].cpu(),
                                                                 torch.arange(t.shape[-1])):
                found.append(node)
    return found


def plan_positions(pm, sites, blocked: set[fx.Node], qk: set[fx.Node], masks: set[fx.Node]):
    """(embedding sites whose index gets + N, (node, user) edges whose value gets + N). ``blocked``: attention
    nodes; ``qk``: their query and key operands; ``masks``: their mask operands."""
    sources = position_sources(pm)
    emb = [s for s in sites if s.kind == "embedding"]
    absolute = [s for s in emb if _index_from(s.input, set(sources))]
    blocked = blocked | {s.node for s in emb}
    to_qk, to_mask = _reaching(pm.graph, qk, blocked), _reaching(pm.graph, masks, blocked)
    edges, seen, todo = [], set(), [s for s in sources if s in to_qk]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user in blocked or user not in to_qk or not isinstance(_val(user), torch.Tensor):
                continue     # a size read off the ids (their batch, for a view) is not a position
            if user in to_mask:
                todo.append(user)
            else:
                edges.append((node, user))
    return absolute, edges


def _reaching(graph: fx.Graph, targets: set[fx.Node], blocked: set[fx.Node]) -> set[fx.Node]:
    """Nodes from which a target is reachable along data flow without passing a blocked node."""
    out: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node in targets or (node not in blocked and any(u in out for u in node.users if u not in blocked)):
            out.add(node)
    return out


def _index_from(node: Any, sources: set[fx.Node]) -> bool:
    for _ in range(12):
        if not isinstance(node, fx.Node):
            return False
        if node in sources:
            return True
        inputs = [a for a in node.all_input_nodes if _val(a) is not None or a.op == "get_attr"]
        if node.op != "call_function" or node.target not in _INDEX_OPS or len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def offset_positions(g: fx.Graph, absolute, edges, n: int) -> None:
    """Apply a :func:`plan_positions` result: add ``n`` at each absolute lookup and on each edge."""
    for site in absolute:
        idx = site_input(site.node, "embedding")
        with g.inserting_before(site.node):
            shifted = g.call_function(aten.add.Tensor, (idx, n))
        shifted.meta = {"val": idx.meta.get("val"), "peftfx": dict(idx.meta.get("peftfx", {}))}
        set_site_input(site.node, "embedding", shifted)
        node = site.node                     # output adapters on the lookup (LoRA on the table) read the ids too
        while len(node.users) == 1 and (user := next(iter(node.users))).op == "call_module" \
                and len(user.args) > 1 and user.args[1] is node:
            if user.args[0] is idx:
                user.replace_input_with(idx, shifted)
            node = user
    offsets: dict[fx.Node, fx.Node] = {}
    for node, user in edges:
        if node not in offsets:
            anchor = [p for p in g.nodes if p.op == "placeholder"][-1] if node.op == "placeholder" else node
            with g.inserting_after(anchor):
                offsets[node] = g.call_function(aten.add.Tensor, (node, n))
            offsets[node].meta = {"val": node.meta.get("val"), "peftfx": dict(node.meta.get("peftfx", {}))}
        user.replace_input_with(node, offsets[node])
