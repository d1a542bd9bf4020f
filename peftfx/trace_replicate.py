"""Trace each distinct repeated block once, then replicate its nodes for the other blocks.

``torch.export`` costs time in proportion to the nodes it traces, and a decoder of N identical layers is N
copies of one subgraph. So :func:`export_replicated` exports a *shallow view* of the model — every top-level
``nn.ModuleList`` of blocks cut to a prefix that holds each kind of block (the same module objects: nothing is
copied, real or ``meta`` weights alike) — with whatever export step the caller passes, and then copies, for every
block the prefix left out, the nodes of a prefix block of the same kind: ``get_attr`` targets, module paths in
``nn_module_stack`` renamed from block ``a`` to block ``j``, the residual stream wired from the previous block's
outputs, and the uses after the list moved to the last block's outputs.

Soundness is structural and conservative; anything unrecognised traces the whole model (one ``logging.info`` line
saying why):

* **Kinds.** Two blocks are of one kind when their module trees (path, class, train flag), parameters and buffers
  (name, shape, dtype, device), forward hooks and plain attributes (numbers, strings, flags, dtypes; an integer
  equal to the block's own index, such as ``layer_idx``, counts as "the index") agree, and so do the entries for
  their index of every config list as long as the block list (``layer_types``). Gemma-style alternating layers are
  two kinds. The prefix is the shortest one holding every consecutive pair of kinds the list has and ending in the
  last block's kind, at least two blocks, so every copied block has a traced model of itself *after a block like
  its predecessor*, and the code after the list reads the outputs of a block like the last.
* **Alignment.** Traced blocks of one kind must be the same graph node for node: same ops, same constants, the
  same meta under the renaming, parameters renamed block to block, inputs from the previous block in one-to-one
  correspondence. So layer-dependent code (a per-layer constant, a branch on ``layer_idx``) makes the prefix
  blocks differ and falls back.
* **Flow.** A block's values go only to later blocks, and only the last prefix block's to the code after the
  list; a value reaching further back than the previous block must be one the previous block reads too (a value
  passed along, as T5's position bias). Per-layer outputs (``output_hidden_states``, attentions) and per-layer
  caches break this and fall back; a key-value cache input falls back before any trace.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .trace_cache import _lookup, _register

__all__ = ["clean_path", "export_replicated", "info"]

log = logging.getLogger(__name__)

_PRIMITIVE = (type(None), bool, int, float, str, torch.dtype)


_STATS = {"replicated": 0, "whole": 0}


class _Unsound(Exception):
    """The shallow trace cannot be replicated soundly (the message says why)."""


@functools.lru_cache(maxsize=8192)
def clean_path(path: str) -> str:
    """A module path from ``nn_module_stack`` in dotted form (``L['self'].model.layers[0]`` → ``model.layers.0``)."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"^L__self__\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\._modules\.", ".", path)
    return path.strip(".")


class _List:
    """One block list of the model: its path, blocks, kind per block and the length of the traced prefix."""

    def __init__(self, path: str, module: nn.ModuleList, kinds: list[int], keep: int):
        self.path, self.module, self.kinds, self.keep = path, module, kinds, keep

    def source(self, j: int) -> int:
        """The prefix block copied for block ``j``: of ``j``'s kind, after a block of ``j - 1``'s kind."""
        k = self.kinds
        return max(a for a in range(1, self.keep) if k[a] == k[j] and k[a - 1] == k[j - 1])


def export_replicated(model: nn.Module, kwargs: dict[str, Any], export: Callable[[], fx.GraphModule]) -> fx.GraphModule:
    """``export()`` (a ``torch.export`` of ``model`` returning the unlifted module) run on a shallow view of
    ``model`` and replicated to the whole model, or ``export()`` of the whole model where that is not sound."""
    lists, why = _plan(model, kwargs) if _enabled() else ([], "PEFTFX_TRACE_REPLICATE=0")
    if why:
        (log.info if lists else log.debug)("tracing %s whole: %s", type(model).__name__, why)
        return _whole(export)
    try:
        with _shallow(model, lists):
            gm = export()
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; the whole model may trace
        log.info("tracing %s whole: its shallow view failed to trace (%s: %s)", type(model).__name__,
                 type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
        return _whole(export)
    try:
        for lst in lists:
            _replicate(gm, model, lst)
        gm.graph.lint()
        gm.recompile()
    except _Unsound as e:
        log.info("tracing %s whole: blocks of %s cannot be replicated soundly: %s", type(model).__name__,
                 getattr(e, "list_path", "?"), e)
        return _whole(export)
    _STATS["replicated"] += 1
    return gm


def info() -> dict[str, int]:
    """How many traces were replicated from a shallow view and how many traced the whole model, in this process."""
    return dict(_STATS)


def _whole(export: Callable[[], fx.GraphModule]) -> fx.GraphModule:
    _STATS["whole"] += 1
    return export()


# -- planning: which lists, which kinds, how long a prefix -------------------------------------------------------

def _plan(model: nn.Module, kwargs: dict[str, Any]) -> tuple[list[_List], str]:
    """The block lists to cut, and why the whole model must be traced instead ("" when it need not)."""
    config = getattr(model, "config", None)
    lists: list[_List] = []
    taken: list[str] = []
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or any(path.startswith(t + ".") for t in taken):
            continue
        taken.append(path)                  # only outermost lists; a list inside a block is part of the block
        if len(mod) < 3:
            continue
        kinds = _kinds(mod, config)
        keep = _prefix(kinds)
        if keep is not None and keep < len(mod):
            lists.append(_List(path, mod, kinds, keep))
    if not lists:
        return [], "no list of 3 or more blocks longer than the prefix that holds each kind"
    for name, v in kwargs.items():
        if not isinstance(v, torch.Tensor) and type(v) in pytree.SUPPORTED_NODES and type(v) not in (list, tuple, dict):
            return lists, f"input {name!r} is a container (a key-value cache holds one entry per layer)"
    for flag in ("use_cache", "output_hidden_states", "output_attentions"):
        default = getattr(config, flag, False) if flag != "use_cache" else False
        if kwargs.get(flag, default) is True:
            return lists, f"{flag}=True returns one entry per layer"
    return lists, ""


def _kinds(blocks: nn.ModuleList, config: Any) -> list[int]:
    n = len(blocks)
    per_layer = [v for k, v in sorted(vars(config).items()) if isinstance(v, (list, tuple)) and len(v) == n] \
        if config is not None else []
    raw = [_describe(b) for b in blocks]
    # an integer attribute equal to the block's own index in every block (layer_idx) is "the index", not a difference
    index = {key for key in raw[0][1] if all(isinstance(r[1].get(key), int) and not isinstance(r[1].get(key), bool)
                                             and r[1][key] == i for i, r in enumerate(raw))}
    seen: dict[str, int] = {}
    kinds = []
    for i, (mods, attrs, tensors) in enumerate(raw):
        values = sorted((key, "<block index>" if key in index else v) for key, v in attrs.items())
        sig = repr((mods, values, tensors, [repr(v[i]) for v in per_layer]))
        kinds.append(seen.setdefault(sig, len(seen)))
    return kinds


def _describe(block: nn.Module) -> tuple[list, dict, list]:
    """(module tree with hooks, plain attributes by (module, name), tensors) of one block."""
    mods, attrs = [], {}
    for name, m in block.named_modules():
        hooks = [id(h) for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()]
        mods.append((name, type(m).__module__ + "." + type(m).__qualname__, m.training, hooks))
        attrs.update({(name, k): _attr(v) for k, v in vars(m).items() if not k.startswith("_")})
    tensors = [(n, tuple(t.shape), str(t.dtype), t.device.type, isinstance(t, nn.Parameter), t.requires_grad)
               for n, t in list(block.named_parameters(remove_duplicate=False))
               + list(block.named_buffers(remove_duplicate=False))]
    return mods, attrs, tensors


def _attr(v: Any) -> Any:
    if isinstance(v, _PRIMITIVE):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, _PRIMITIVE) for x in v):
        return tuple(v)
    if callable(v) and hasattr(v, "__qualname__"):
        return getattr(v, "__module__", "") + "." + v.__qualname__
    return type(v).__qualname__             # an object (the shared config): its type


def _prefix(kinds: list[int]) -> int | None:
    """The shortest prefix (≥ 2) holding every pair (kind of j-1, kind of j) of the list and ending in a block of
    the last block's kind (the code after the list reads the last block's outputs)."""
    pairs = {(kinds[j - 1], kinds[j]) for j in range(1, len(kinds))}
    have: set[tuple[int, int]] = set()
    for a in range(1, len(kinds)):
        have.add((kinds[a - 1], kinds[a]))
        if have >= pairs and kinds[a] == kinds[-1]:
            return a + 1
    return None


@contextlib.contextmanager
def _shallow(model: nn.Module, lists: list[_List]) -> Iterator[None]:
    """Every list cut to its prefix (the same block modules), and every layer count that equals a cut list's length
    (:func:`_counters`) set to its prefix's, all restored on exit. Code that counts layers through the config
    (``i == config.num_hidden_layers - 1``) then sees the prefix's last block as the last, so a last block traced
    differently shows as a difference between blocks of one kind instead of a silent copy of a middle block."""
    saved = [(lst.module, lst.module.__dict__["_modules"]) for lst in lists]
    counters = _counters(model, lists)
    try:
        for obj, name, _, keep in counters:
            setattr(obj, name, keep)
        for lst in lists:
            items = list(lst.module.__dict__["_modules"].items())[: lst.keep]
            lst.module.__dict__["_modules"] = OrderedDict(items)
        yield
    finally:
        for mod, modules in saved:
            mod.__dict__["_modules"] = modules
        for obj, name, value, _ in counters:
            setattr(obj, name, value)


def _counters(model: nn.Module, lists: list[_List]) -> list[tuple[Any, str, int, int]]:
    """(object, attribute, value, prefix length) for every integer attribute named like a layer count
    (``num_hidden_layers``, ``n_layer``, ``num_decoder_layers``) of the config or of a module outside the lists that
    equals a cut list's length; one whose length two lists share with different prefixes is an error."""
    keeps: dict[int, set[int]] = {}
    for lst in lists:
        keeps.setdefault(len(lst.module), set()).add(lst.keep)
    inside = tuple(lst.path + "." for lst in lists)
    owners = [getattr(model, "config", None)] + [m for p, m in model.named_modules() if not (p + ".").startswith(inside)]
    out, seen = [], set()
    for obj in owners:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        for name, value in list(vars(obj).items()):
            if "layer" not in name.lower() or name.startswith("_") or type(value) is not int or value not in keeps:
                continue
            if len(keeps[value]) > 1:
                raise _Unsound(f"{name}={value} counts two lists cut to different prefixes")
            out.append((obj, name, value, next(iter(keeps[value]))))
    return out


# -- replication on the traced graph -----------------------------------------------------------------------------

def _replicate(gm: fx.GraphModule, model: nn.Module, lst: _List) -> None:
    try:
        _Replicator(gm, model, lst).run()
    except _Unsound as e:
        e.list_path = lst.path
        raise


class _Replicator:
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


def _enabled() -> bool:
    return os.environ.get("PEFTFX_TRACE_REPLICATE", "1") not in ("0", "false", "off", "")


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


def _renamed_stack(n: fx.Node, lst: str, x: int, y: int) -> dict:
    out = {}
    for key, (p, c) in (n.meta.get("nn_module_stack") or {}).items():
        path = clean_path(p)
        new = _swap(path, lst, x, y)
        out[key if new == path else f"{key}@{new}"] = (new, c)
    return out
