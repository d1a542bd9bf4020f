"""Copies of fx graphs that share no mutable state with the original (the same node names, so the same generated
code): the trace cache's copies of its graphs and :meth:`peftfx.model.PeftModel.fork` use them."""
from __future__ import annotations

import copy
import re
from typing import Any

from torch import fx

__all__ = ["copy_graph"]


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """``graph`` copied node by node, as ``Graph.graph_copy`` + ``output`` copy it (the same names, in the same
    order, the same namespace state, ``meta`` dicts shallow-copied), without what ``create_node`` does for nodes
    made anew (name generation, a scan of every argument for raw symbolic values): those names and arguments
    are already a valid graph's. Falls back to ``graph_copy`` where fx lacks the internals this uses."""
    new = fx.Graph()
    try:
        ns, insert, table = new._graph_namespace, new._insert, new._find_nodes_lookup_table
        used, to_name, counts = ns._used_names, ns._obj_to_name, ns._base_count
    except AttributeError:
        return _fx_copy_graph(graph)
    env: dict[fx.Node, fx.Node] = {}

    def remap(a: Any) -> Any:         # Node() turns lists and dicts into fx's immutable ones, as create_node does
        t = type(a)
        if t is fx.Node:
            return env[a]
        if t is tuple:
            return tuple([remap(x) for x in a])
        if isinstance(a, list):
            return [remap(x) for x in a]
        if isinstance(a, dict):
            return {k: remap(x) for k, x in a.items()}
        if isinstance(a, (tuple, slice, fx.Node)):   # a named tuple, a slice: fx's own mapping
            return fx.node.map_arg(a, env.__getitem__)
        return a

    for node in graph.nodes:
        name, output = node.name, node.op == "output"
        n = fx.Node(new, name, node.op, node.target, remap(node.args), remap(node.kwargs) if node.kwargs else {},
                    None if output else node.type)
        if not output:                  # (graph_copy stops at the output, which Graph.output makes anew)
            n.meta = copy.copy(node.meta)       # before the lookup table has it: no remove and re-insert
        m = _NAME.match(name)                      # what Namespace.create_name records for an unused valid name
        base, num = m.group(1, 2) if m else (name, None)
        counts[base] = int(num) if num is not None else counts.get(base, 0)
        used.add(name)
        to_name[n] = name
        insert(n)
        table.insert(n)
        new._len += 1
        if output:
            break
        env[node] = n
    new._codegen = copy.deepcopy(graph._codegen)
    return new


_NAME = re.compile(r"^([a-zA-Z_][0-9a-zA-Z_]*?)(?:_(\d+))?$")      # fx's own: a name's base and numeric suffix


def _fx_copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` that shares no mutable state with it: new nodes (same names, so the same generated
    code), each node's ``meta`` dict new and its ``"peftfx"`` entry (which passes edit) copied too."""
    new = _copy_graph(graph)
    for node in new.nodes:
        if "peftfx" in node.meta:
            node.meta["peftfx"] = _copy_value(node.meta["peftfx"])
    return new


_ATOMS = (str, int, float, bool, type(None))


def _copy_value(v: Any) -> Any:
    """``copy.deepcopy(v)`` for the plain data passes keep in ``meta["peftfx"]`` (strings and numbers kept, dicts,
    lists and tuples rebuilt), done by hand where it can be; anything else goes through ``deepcopy``."""
    t = type(v)
    if t in _ATOMS:
        return v
    if t is dict:
        return {k: _copy_value(x) for k, x in v.items()}
    if t is list:
        return [_copy_value(x) for x in v]
    if t is tuple:
        return tuple(_copy_value(x) for x in v)
    return copy.deepcopy(v)
