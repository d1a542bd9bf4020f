"""The copying of the replicated trace (:mod:`peftfx.trace_replicate`): for every block the shallow view left out,
the nodes of a checked prefix block of its kind (:class:`peftfx._replicate_check._Blocks`) copied with its own
weights and module paths, the residual stream wired from the previous block, and the uses after the list moved
to the last block's outputs."""
from __future__ import annotations

from torch import fx, nn

from ._replicate_check import _Blocks, _swap, clean_path
from ._replicate_plan import _List, _Unsound
from .trace_cache import _lookup, _register


def _replicate(gm: fx.GraphModule, model: nn.Module, lst: _List) -> None:
    try:
        _Replicator(gm, model, lst).run()
    except _Unsound as e:
        e.list_path = lst.path
        raise


class _Replicator(_Blocks):
    """Copies of checked prefix blocks for the blocks the shallow view left out."""

    def run(self) -> None:
        lst, blocks = self.lst, self.blocks
        if any(not b for b in blocks):
            raise _Unsound("a traced block has no nodes (the forward does not call every block in order)")
        self._check_flow()
        firsts: dict[int, int] = {}
        for b in range(lst.keep):                          # every traced block is its kind's first, node for node
            self._align(firsts.setdefault(lst.kinds[b], b), b)
        last = blocks[-1]
        anchor = max(last, key=self.pos.__getitem__)
        outside = {u for n in last for u in n.users if u not in self.block_of}
        if any(self.pos[u] < self.pos[anchor] for u in outside):
            raise _Unsound("code after the list runs between the nodes of its last block")
        prev: dict[fx.Node, fx.Node] = {n: n for n in last}    # last traced block's nodes → block j-1's nodes
        prev_src = lst.keep - 1
        with self.gm.graph.inserting_before(anchor.next):    # in order, right after the last traced block
            for j in range(lst.keep, len(lst.module)):
                a = lst.source(j)
                back = self._align(a - 1, prev_src)        # block a-1's nodes → those of block j-1's source
                new = self._copy(a, j, {n: prev[back[n]] for n in blocks[a - 1]})
                prev, prev_src = new, a
        back = self._align(lst.keep - 1, prev_src)
        for n in last:
            for u in list(n.users):
                if u in outside:
                    u.replace_input_with(n, prev[back[n]])

    def _copy(self, a: int, j: int, stream: dict[fx.Node, fx.Node]) -> dict[fx.Node, fx.Node]:
        """Nodes of block ``a`` copied for block ``j`` at the graph's insertion point; ``stream`` maps block a-1's
        nodes to block j-1's. Returns block a's nodes → their copies."""
        graph = self.gm.graph
        env: dict[fx.Node, fx.Node] = {}

        def arg(v: fx.Node) -> fx.Node:
            if v in env:
                return env[v]
            if v in stream:
                return stream[v]
            b = self.block_of.get(v)
            if b is not None and not any(self.block_of.get(u) == a - 1 for u in v.users):
                raise _Unsound(f"block {a} reads {v.name} of block {b}, which block {a - 1} does not read")
            return v                                   # from before the list, or passed along (checked in flow)
        for n in self.blocks[a]:
            if n.op == "get_attr":
                target = self._rename(n.target, a, j)
                t = _lookup(self.model, target)
                if t is None:
                    raise _Unsound(f"the model has no tensor {target}")
                _register(self.gm, target, t)
                c = graph.get_attr(target)
                c.meta = dict(n.meta)
            else:
                c = graph.node_copy(n, arg)
                c.meta = dict(n.meta)
                c.meta["nn_module_stack"] = _renamed_stack(n, self.lst.path, a, j)
            env[n] = c
        return env


def _renamed_stack(n: fx.Node, lst: str, x: int, y: int) -> dict:
    out = {}
    for key, (p, c) in (n.meta.get("nn_module_stack") or {}).items():
        path = clean_path(p)
        new = _swap(path, lst, x, y)
        out[key if new == path else f"{key}@{new}"] = (new, c)
    return out
