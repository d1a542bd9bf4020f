"""The structural checks of the replicated trace (:mod:`peftfx.trace_replicate`) on the shallow view's graph: each
node's block (from its module path), the flow between blocks (a block's values reach only later blocks, the code
after the list reads only the last), and blocks of one kind aligned node for node (ops, constants, module paths
and weights under the renaming, inputs from the previous block one-to-one). :class:`_Blocks` raises
:class:`_Unsound` wherever replication would not be exact; :mod:`peftfx._replicate_copy` copies on top of it."""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ._replicate_plan import _List, _Unsound
from .trace_cache import _lookup


@functools.lru_cache(maxsize=8192)
def clean_path(path: str) -> str:
    """A module path from ``nn_module_stack`` in dotted form (``L['self'].model.layers[0]`` → ``model.layers.0``)."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"^L__self__\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\._modules\.", ".", path)
    return path.strip(".")


class _Blocks:
    """The traced prefix blocks of one list, node by node, with the checks replication relies on."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, lst: _List):
        self.gm, self.model, self.lst = gm, model, lst
        self.blocks: list[list[fx.Node]] = [[] for _ in range(lst.keep)]
        self.block_of: dict[fx.Node, int] = {}
        self.pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        for n in gm.graph.nodes:
            b = self._membership(n)
            if b is not None:
                self.blocks[b].append(n)
                self.block_of[n] = b
        self._aligned: dict[tuple[int, int], dict[fx.Node, fx.Node]] = {}

    def _membership(self, n: fx.Node) -> int | None:
        prefix = self.lst.path + "."
        if n.op == "get_attr":
            path = str(n.target)
        elif n.op in ("call_function", "call_method") and not _is_symbolic(n):
            stack = n.meta.get("nn_module_stack") or {}
            path = next((p for p in (clean_path(v[0]) for v in stack.values()) if p.startswith(prefix)), "")
        else:
            return None
        if not path.startswith(prefix):
            return None
        head = path[len(prefix):].split(".", 1)[0]
        if not head.isdigit() or int(head) >= self.lst.keep:
            raise _Unsound(f"node {n.name} belongs to block {head}, outside the traced prefix")
        return int(head)

    def _check_flow(self) -> None:
        keep = self.lst.keep
        for n, b in self.block_of.items():
            for u in n.users:
                ub = self.block_of.get(u)
                if ub is None and b < keep - 1 and not _is_symbolic(u):
                    raise _Unsound(f"{n.name} of block {b} is used by {u.name} outside the blocks (a per-layer "
                                   "output or code between blocks)")
                if ub is not None and ub < b:
                    raise _Unsound(f"{n.name} of block {b} is used by the earlier block {ub}")
                if ub is not None and ub > b + 1 and not any(self.block_of.get(w) == ub - 1 for w in n.users):
                    raise _Unsound(f"block {ub} reads {n.name} of block {b}, which block {ub - 1} does not read")
        # code after the list must not feed back into a block (a model-level op between layers)
        frontier = [u for n in self.blocks[-1] for u in n.users if u not in self.block_of]
        seen: set[fx.Node] = set()
        while frontier:
            u = frontier.pop()
            if u in seen:
                continue
            seen.add(u)
            for w in u.users:
                if w in self.block_of:
                    raise _Unsound(f"{u.name}, computed outside the blocks from the last one, feeds block "
                                   f"{self.block_of[w]}")
                frontier.append(w)

    def _align(self, x: int, y: int) -> dict[fx.Node, fx.Node]:
        """Block x's nodes → block y's, checked node for node (ops, constants, meta under the renaming, weights
        renamed, inputs from the previous block one-to-one); raises :class:`_Unsound` where they differ."""
        if x == y:
            return {n: n for n in self.blocks[x]}
        if (x, y) in self._aligned:
            return self._aligned[(x, y)]
        bx, by = self.blocks[x], self.blocks[y]
        if len(bx) != len(by):
            raise _Unsound(f"blocks {x} and {y} are of one kind but traced to {len(bx)} and {len(by)} nodes")
        m = dict(zip(bx, by))
        ext: dict[fx.Node, fx.Node] = {}
        rev: dict[fx.Node, fx.Node] = {}
        for n1, n2 in m.items():
            target = self._rename(n1.target, x, y) if n1.op == "get_attr" else n1.target
            if n1.op != n2.op or target != n2.target:
                raise _Unsound(f"blocks {x} and {y} differ at {n1.format_node()} / {n2.format_node()}")
            if _stack(n1, self.lst.path, x, y) != _stack(n2, self.lst.path, y, y):
                raise _Unsound(f"blocks {x} and {y} differ in the module path of {n1.name} / {n2.name}")
            l1, s1 = pytree.tree_flatten((n1.args, n1.kwargs))
            l2, s2 = pytree.tree_flatten((n2.args, n2.kwargs))
            if s1 != s2 or len(l1) != len(l2):
                raise _Unsound(f"blocks {x} and {y} differ in the arguments of {n1.name} / {n2.name}")
            for a1, a2 in zip(l1, l2):
                if not self._same_arg(a1, a2, m, ext, rev, x, y):
                    raise _Unsound(f"blocks {x} and {y} differ in an argument of {n1.format_node()} / "
                                   f"{n2.format_node()}")
        self._aligned[(x, y)] = m
        return m

    def _same_arg(self, a1, a2, m, ext, rev, x, y) -> bool:
        if not isinstance(a1, fx.Node) or not isinstance(a2, fx.Node):
            both_nan = isinstance(a1, float) and math.isnan(a1) and math.isnan(a2)
            return type(a1) is type(a2) and (a1 == a2 or both_nan)
        if a1 in m:
            return m[a1] is a2
        if ext.setdefault(a1, a2) is not a2 or rev.setdefault(a2, a1) is not a1:
            return False
        if a1 is a2:                      # read by both: from before the list, or passed along from before both
            return a1 not in self.block_of or self.block_of[a1] < min(x, y)
        if _is_symbolic(a1) and _is_symbolic(a2):
            return str(a1.meta.get("val")) == str(a2.meta.get("val"))
        if a1.op == a2.op == "get_attr" and a1 not in self.block_of and a2 not in self.block_of:
            t1, t2 = _lookup(self.gm, a1.target), _lookup(self.gm, a2.target)   # constants lifted per block
            return t1 is not None and t2 is not None and t1.shape == t2.shape and t1.dtype == t2.dtype \
                and t1.device.type != "meta" and t2.device.type != "meta" and torch.equal(t1, t2)
        b1, b2 = self.block_of.get(a1), self.block_of.get(a2)
        stream1 = b1 == x - 1 if x > 0 else b1 is None
        stream2 = b2 == y - 1 if y > 0 else b2 is None
        return stream1 and stream2

    def _rename(self, target: Any, x: int, y: int) -> Any:
        if not isinstance(target, str) or x == y:
            return target
        old, new = f"{self.lst.path}.{x}.", f"{self.lst.path}.{y}."
        if not target.startswith(old):
            raise _Unsound(f"block {x} reads {target}, a tensor of another block")
        return new + target[len(old):]


def _is_symbolic(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _swap(path: str, lst: str, x: int, y: int) -> str:
    old = f"{lst}.{x}"
    if path == old or path.startswith(old + "."):
        return f"{lst}.{y}" + path[len(old):]
    return path


def _stack(n: fx.Node, lst: str, x: int, y: int) -> list:
    """``n``'s module stack as (clean path, class) with block x's paths renamed to block y's."""
    stack = n.meta.get("nn_module_stack") or {}
    return [(_swap(clean_path(p), lst, x, y), str(c)) for p, c in stack.values()]
