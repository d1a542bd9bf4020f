"""The layered view of a traced model: one submodule per repeated block, for activation checkpointing and FSDP2.

The flat graph (``peft.graph``) stays the one source of truth: roles, rules, splice, merge and export act on it and
see the same sites as always. From it, on demand, peftfx derives an *executable* layered view:

* **blocks** — every node is assigned to the repeated block it belongs to, read from its module path
  (``node.meta["peftfx"]["path"]``; a block is the outermost ``parent.N`` path whose parent has at least two
  numbered children: ``model.layers.3``, ``transformer.h.0``, ``encoder.block.1``). ``get_attr`` nodes of a block's
  own tensors, and nodes computed between two nodes of one block (on a data path from the block back into it), join
  that block; everything else (embeddings, rotary tables, masks, final norm, head, loss) stays in the root.
* **one submodule per block** — the module that holds a block's parameters in the traced model
  (``peft.model.layers[3]``) becomes a :class:`LayerBlock` over the same parameter, buffer and submodule
  dictionaries (so ``state_dict`` keys, optimizers and the flat graph's ``get_attr`` are unchanged) whose forward
  runs the block's partition of the graph, reading its tensors as its own attributes. The root graph calls the
  blocks as ``call_module`` nodes. A block therefore owns (registers) exactly the parameters its partition reads,
  which is what ``fully_shard(block)`` needs to gather one block at a time.
* **checkpointing** — a block runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` when
  checkpointing is on, the model is in train mode and autograd is recording. The RNG state is stashed and restored
  for the recomputation, so dropout (graph dropout, SDPA dropout, adapter dropout) replays the same masks and the
  gradients equal those without checkpointing. A block that mutates state in place (a BatchNorm's running
  statistics) would update it twice when recomputed: such blocks run without checkpointing (logged once).

The view is rebuilt whenever the flat graph's code changes (a pass, an adapter added, a train/eval switch, which
rewrites dropout arguments); the :class:`LayerBlock` modules themselves persist (an FSDP2 unit keeps its state), only
their code is replaced. The graphs of other call signatures and modes (:mod:`peftfx.variants`) get their own view
with the settings of the model they belong to.

When the partition is impossible (no repeated block, or two blocks that feed each other), the model runs its flat
graph, and :func:`gradient_checkpointing` raises a :class:`~peftfx.PeftfxError` saying why.
"""
from __future__ import annotations

import heapq
import itertools
import linecache
import logging
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ._errors import PeftfxError
from .model import PeftModel, register_service, require_peft

__all__ = ["LayerBlock", "Partition", "blocks", "gradient_checkpointing", "layered", "partition"]

log = logging.getLogger(__name__)


@dataclass
class _Settings:
    layered: bool = False       # run the layered view (checkpointing or FSDP2 per block asked for it)
    checkpoint: bool = False    # run each block under torch.utils.checkpoint in train mode
    home: Any = None            # weakref to the model whose blocks are FSDP2 units: other graphs run its modules


#: per original module, the models traced from it that hold settings (a model's other graphs find theirs here)
_HOMES: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def _settings(pm: PeftModel, create: bool = False) -> _Settings | None:
    """``pm``'s settings: its own, or (a graph of another signature/mode) those of the model it belongs to."""
    own = pm.__dict__.get("_peftfx_layers")
    if own is not None:
        return own
    origin = pm.__dict__.get("_peftfx_origin")
    source = origin[0] if origin is not None else None
    if source is not None:
        for ref in _HOMES.get(source, ()):
            home = ref()
            variants = home.peft_variants if home is not None else None
            if variants is not None and any(g is pm for g in variants.graphs.values()):
                pm.__dict__["_peftfx_layers"] = found = home.__dict__["_peftfx_layers"]
                return found
    if not create:
        return None
    pm.__dict__["_peftfx_layers"] = found = _Settings()
    if source is not None:
        homes = _HOMES.setdefault(source, [])
        homes[:] = [r for r in homes if r() is not None] + [weakref.ref(pm)]
    return found


# ------------------------------------------------------------------------------------------------ public API
def gradient_checkpointing(pm: PeftModel, enable: bool = True) -> list[str]:
    """Turn activation checkpointing per repeated block on (or off) for ``pm`` and every graph of its other call
    signatures and modes. Returns the block paths (``["model.layers.0", …]``).

    Gradients equal those without checkpointing (dropout replays its masks); activations inside a block are not
    kept for backward but recomputed, so peak training memory falls to the blocks' inputs plus one block's
    activations. Only train-mode calls with autograd recording are checkpointed. Raises :class:`PeftfxError` when
    the graph has no repeated blocks to checkpoint (the model is left as it was)."""
    require_peft(pm, "gradient_checkpointing")
    if not enable:
        s = _settings(pm)
        if s is not None:
            s.checkpoint = False
        return blocks(pm) if s is not None and s.layered else []
    view = _view(pm, rebuild=True)          # raises when there is nothing to partition; nothing changed then
    s = _settings(pm, create=True)
    s.layered = s.checkpoint = True
    return list(view.blocks)


def layered(pm: PeftModel, sharded: bool = False) -> list[LayerBlock]:
    """Make ``pm`` run its layered view (one :class:`LayerBlock` submodule call per repeated block) and return the
    blocks in order; what FSDP2 per-block sharding needs (:func:`peftfx.integrations.fsdp.fully_shard_blocks`).
    ``sharded``: ``pm``'s modules are about to become FSDP2 units; the graphs of ``pm``'s other call signatures and
    modes then run ``pm``'s block and root modules (so FSDP2 gathers for them too), not modules of their own."""
    require_peft(pm, "layered")
    view = _view(pm, rebuild=True)
    s = _settings(pm, create=True)
    s.layered = True
    if sharded:
        s.home = weakref.ref(pm)
        if pm.peft_variants is not None:
            pm.peft_variants.graphs.clear()    # graphs built before run modules of their own: rebuilt on next use
    return [pm.get_submodule(b) for b in view.blocks]


def blocks(pm: PeftModel) -> list[str]:
    """The repeated-block paths the layered view of ``pm``'s graph has (empty when there are none)."""
    require_peft(pm, "blocks")
    return list(partition(pm).blocks)


# ------------------------------------------------------------------------------------------------ partition
@dataclass
class Partition:
    """Per node the block path it runs in (``""``: the root), the blocks in order, and why blocks were dropped."""

    owner: dict[fx.Node, str]
    blocks: list[str]
    dropped: dict[str, str] = field(default_factory=dict)


def _block_of_paths(paths: set[str]) -> Callable[[str], str]:
    children: dict[str, set[str]] = {}
    for p in paths:
        parts = p.split(".")
        for i, c in enumerate(parts):
            if c.isdigit():
                children.setdefault(".".join(parts[:i]), set()).add(c)

    def block_of(path: str) -> str:
        parts = path.split(".") if path else []
        for i, c in enumerate(parts):
            if c.isdigit() and len(children.get(".".join(parts[:i]), ())) >= 2:
                return ".".join(parts[: i + 1])
        return ""
    return block_of


def _is_module(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def partition(gm: fx.GraphModule) -> Partition:
    """Assign every node of ``gm``'s graph to a repeated block or to the root (see the module docstring)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    paths = {n.meta.get("peftfx", {}).get("path") or "" for n in nodes}
    block_of = _block_of_paths(paths)
    owner: dict[fx.Node, str] = {}
    for n in nodes:
        b = ""
        if n.op in ("call_function", "call_method", "call_module"):
            b = block_of(n.meta.get("peftfx", {}).get("path") or "")
            if n.op == "call_module" and b and not str(n.target).startswith(b + "."):
                b = ""                                    # a module of the root called here: see the closure below
        owner[n] = b
    valid = {b for b in set(owner.values()) if b and _is_module(gm, b)}
    for n in nodes:
        if owner[n] not in valid:
            owner[n] = ""
    dropped: dict[str, str] = {}
    for _ in range(len(valid) + 1):                       # each round drops at least one block or ends
        conflict = _close(nodes, pos, owner, valid)
        if conflict is None:
            break
        for b in conflict[:2]:
            valid.discard(b)
            dropped[b] = conflict[2]
            for n in nodes:
                if owner[n] == b:
                    owner[n] = ""
    for n in nodes:                                       # a block's own tensors read only inside it
        if n.op == "get_attr":
            users = {owner[u] for u in n.users}
            if len(users) == 1 and (b := next(iter(users))) and str(n.target).startswith(b + "."):
                owner[n] = b
    for n in nodes:                                       # a module the block cannot reach: not a block then
        b = owner[n]
        if b and n.op == "call_module" and not str(n.target).startswith(b + "."):
            valid.discard(b)
            dropped[b] = f"it calls {n.target}, a module outside it"
    if dropped:
        for n in nodes:
            if owner[n] in dropped:
                owner[n] = ""
    order = sorted(valid, key=lambda b: min(pos[n] for n in nodes if owner[n] == b))
    return Partition(owner, order, dropped)


def _close(nodes: list[fx.Node], pos: dict[fx.Node, int], owner: dict[fx.Node, str],
           valid: set[str]) -> tuple[str, str, str] | None:
    """Move into each block the root nodes lying on a path from the block back into it. Returns two blocks and a
    reason when one block's nodes lie on such a path of another's (they cannot be separate calls)."""
    members: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if owner[n]:
            members.setdefault(owner[n], []).append(n)
    for b in sorted(valid):
        mine = members.get(b, [])
        if not mine:
            continue
        lo, hi = pos[mine[0]], pos[mine[-1]]
        span = nodes[lo:hi + 1]
        down = set()
        for n in span:                                    # reachable from the block
            if owner[n] == b or any(a in down for a in n.all_input_nodes):
                down.add(n)
        up = set()
        for n in reversed(span):                          # reaching the block
            if owner[n] == b or any(u in up for u in n.users):
                up.add(n)
        for n in span:
            if n in down and n in up and owner[n] != b:
                if owner[n]:
                    return (b, owner[n], f"{n.name} lies between nodes of {b} and belongs to {owner[n]}")
                owner[n] = b
    return None


# ------------------------------------------------------------------------------------------------ blocks
class LayerBlock(nn.Module):
    """One repeated block of a traced model, as a module: it holds the block's parameters, buffers and submodules
    (adapters included) under the same names as the traced model did, and its forward runs the block's part of the
    graph (under activation checkpointing when on). Made by the layered view; not built by hand."""

    def __init__(self, holder: nn.Module):
        super().__init__()
        self._parameters = holder._parameters
        self._buffers = holder._buffers
        self._non_persistent_buffers_set = holder._non_persistent_buffers_set
        self._modules = holder._modules
        self.training = holder.training
        self.__dict__["_peftfx_code"] = None
        self.__dict__["_peftfx_codes"] = {}          # code of the same block in other graphs (FSDP2: see _borrow)
        self.__dict__["_peftfx_settings"] = None
        self.__dict__["_peftfx_mutates"] = False

    def forward(self, *args: Any, _graph: str | None = None) -> tuple:
        fn = self.__dict__["_peftfx_code"] if _graph is None else self.__dict__["_peftfx_codes"].get(_graph)
        if fn is None:
            raise PeftfxError("this LayerBlock has no code: it runs only as part of its peftfx model's layered view.")
        s = self.__dict__["_peftfx_settings"]
        if (s is not None and s.checkpoint and self.training and torch.is_grad_enabled()
                and not self.__dict__["_peftfx_mutates"]):
            from torch.utils.checkpoint import checkpoint
            return checkpoint(fn, self, *args, use_reentrant=False)
        return fn(self, *args)


@dataclass
class _View:
    code: str                        # the flat graph's code the view was built from (identity marks staleness)
    forward: Callable                # the root graph's forward(self, …)
    blocks: list[str]
    graph: fx.Graph                  # the root graph (call_module per block), for inspection and tests


_COUNTER = itertools.count()


def _compile(graph: fx.Graph) -> Callable:
    """``graph``'s Python code as a function ``forward(self, …)`` (as ``GraphModule.recompile`` makes it)."""
    code = graph.python_code(root_module="self")
    key = f"<peftfx-layers-{next(_COUNTER)}>"
    linecache.cache[key] = (len(code.src), None, code.src.splitlines(True), key)
    scope = dict(code.globals)
    exec(compile(code.src, key, "exec"), scope)  # noqa: S102 - code generated by torch.fx from our graph
    return scope["forward"]


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _view(pm: PeftModel, rebuild: bool = False) -> _View:
    view = pm.__dict__.get("_peftfx_layers_view")
    if view is not None and view.code is pm.__dict__.get("_code") and not rebuild:
        return view
    part = partition(pm)
    if not part.blocks:
        why = "; ".join(f"{b}: {r}" for b, r in part.dropped.items())
        raise PeftfxError(f"{type(pm).__name__}'s graph has no repeated blocks to run one at a time (no module path "
                          f"'parent.N' with two or more numbered children{'; dropped ' + why if why else ''}). "
                          "Activation checkpointing and FSDP2 per block need blocks such as model.layers.N.")
    for b, why in part.dropped.items():
        log.info("layered view of %s: %s runs in the root graph (%s)", type(pm).__name__, b, why)
    settings = _settings(pm, create=True)
    root = _build(pm, part, settings)
    view = _View(pm.__dict__.get("_code"), _compile(root), list(part.blocks), root)
    pm.__dict__["_peftfx_layers_view"] = view
    return view


def _build(pm: PeftModel, part: Partition, settings: _Settings) -> fx.Graph:
    """The root graph (blocks as ``call_module`` nodes); each block's code installed on its :class:`LayerBlock`."""
    nodes = list(pm.graph.nodes)
    owner = part.owner
    members: dict[str, list[fx.Node]] = {b: [] for b in part.blocks}
    for n in nodes:
        if owner[n]:
            members[owner[n]].append(n)
    ios: dict[str, tuple[list[fx.Node], list[fx.Node]]] = {}
    home = settings.home() if settings.home is not None else None
    graph_key = None
    if home is not None and home is not pm:   # FSDP2 units live in `home`: run its modules (see _borrow)
        graph_key = pm.__dict__.setdefault("_peftfx_graph_key", f"g{next(_COUNTER)}")
    for b, mine in members.items():
        inside = set(mine)
        inputs = list(dict.fromkeys(a for n in mine for a in n.all_input_nodes if a not in inside))
        outputs = [n for n in mine if any(u not in inside for u in n.users)]
        ios[b] = (inputs, outputs)
        block = _install_block(pm, b) if graph_key is None else _borrow(pm, home, b)
        code = _compile(_block_graph(b, mine, inputs, outputs))
        if graph_key is None:
            block.__dict__["_peftfx_code"] = code
        else:
            block.__dict__["_peftfx_codes"][graph_key] = code
        block.__dict__["_peftfx_settings"] = settings
        mutates = any(_mutates(n) for n in mine)
        if mutates and not block.__dict__["_peftfx_mutates"]:
            log.info("%s changes state in place (e.g. BatchNorm statistics); it runs without checkpointing", b)
        block.__dict__["_peftfx_mutates"] = mutates
    root = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for unit in _unit_order(nodes, owner, members):
        if isinstance(unit, str):
            inputs, outputs = ios[unit]
            call = root.call_module(unit, tuple(env[a] for a in inputs), {"_graph": graph_key} if graph_key else None)
            call.meta["peftfx"] = {"path": unit, "block": unit}
            for i, o in enumerate(outputs):
                env[o] = root.call_function(operator.getitem, (call, i))
                env[o].meta = dict(o.meta)
        else:
            env[unit] = root.node_copy(unit, lambda a: env[a])
    root._codegen = pm.graph._codegen
    root.lint()
    if graph_key is not None:
        _borrow_root(pm, home, root)
    return root


def _unit_order(nodes: list[fx.Node], owner: dict[fx.Node, str], members: dict[str, list[fx.Node]]) -> list:
    """Root nodes and blocks (one unit each) in a dependency order that keeps the flat graph's order where it can
    (a block takes the place of its first node; convexity makes the quotient graph acyclic)."""
    pos = {n: i for i, n in enumerate(nodes)}
    unit_of = {n: (owner[n] or n) for n in nodes}
    key = {u: (pos[m[0]] if isinstance(u, str) else pos[u]) for u, m in
           [(b, members[b]) for b in members] + [(n, None) for n in nodes if not owner[n]]}
    deps: dict[Any, set] = {u: set() for u in key}
    for n in nodes:
        for a in n.all_input_nodes:
            if unit_of[a] != unit_of[n]:
                deps[unit_of[n]].add(unit_of[a])
    users: dict[Any, list] = {u: [] for u in key}
    for u, ds in deps.items():
        for d in ds:
            users[d].append(u)
    missing = {u: len(ds) for u, ds in deps.items()}
    heap = [(key[u], i, u) for i, u in enumerate(key) if not missing[u]]
    tie = {u: i for i, u in enumerate(key)}
    heapq.heapify(heap)
    out = []
    while heap:
        _, _, u = heapq.heappop(heap)
        out.append(u)
        for v in users[u]:
            missing[v] -= 1
            if not missing[v]:
                heapq.heappush(heap, (key[v], tie[v], v))
    if len(out) != len(key):
        raise PeftfxError("internal: the layered view's blocks depend on each other in a cycle; please report.")
    return out


def _block_graph(path: str, mine: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.Graph:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = g.placeholder(a.name)
        env[a].meta = dict(a.meta)
    cut = len(path) + 1
    for n in mine:
        new = g.node_copy(n, lambda a: env[a])
        if n.op in ("get_attr", "call_module"):
            new.target = str(n.target)[cut:]
        env[n] = new
    g.output(tuple(env[o] for o in outputs))
    g.lint()
    return g


def _install_block(pm: PeftModel, path: str) -> LayerBlock:
    holder = pm.get_submodule(path)
    if isinstance(holder, LayerBlock):
        return holder
    parent_path, _, leaf = path.rpartition(".")
    parent = pm.get_submodule(parent_path) if parent_path else pm
    block = LayerBlock(holder)
    parent._modules[leaf] = block
    return block


def _borrow(pm: PeftModel, home: PeftModel, path: str) -> LayerBlock:
    """Another graph of a model whose blocks are FSDP2 units (``home``) calls ``home``'s block modules, so FSDP2
    gathers their parameters for it; each block keeps this graph's code beside its own (``_graph=`` key)."""
    try:
        block = home.get_submodule(path)
    except AttributeError:
        block = None
    if not isinstance(block, LayerBlock):
        raise PeftfxError(f"the graph for these inputs/this mode has a block {path} that the sharded model has not; "
                          "call the model with the inputs it was traced with.")
    parent_path, _, leaf = path.rpartition(".")
    (pm.get_submodule(parent_path) if parent_path else pm)._modules[leaf] = block
    return block


def _borrow_root(pm: PeftModel, home: PeftModel, root: fx.Graph) -> None:
    """The root graph's own tensors read through ``home``'s modules (the root FSDP2 unit sets its gathered
    parameters there), where ``home`` has every tensor this graph reads from that module."""
    owners: dict[str, list[str]] = {}
    for n in root.nodes:
        if n.op == "get_attr" and "." in str(n.target):
            owner, _, leaf = str(n.target).rpartition(".")
            owners.setdefault(owner, []).append(leaf)
    for owner, leaves in owners.items():
        try:
            theirs = home.get_submodule(owner)
        except AttributeError:
            continue
        if theirs is pm.get_submodule(owner) or not all(hasattr(theirs, leaf) for leaf in leaves):
            continue
        parent_path, _, leaf = owner.rpartition(".")
        (pm.get_submodule(parent_path) if parent_path else pm)._modules[leaf] = theirs


# ------------------------------------------------------------------------------------------------ dispatch
def _layered_forward(pm: PeftModel) -> Callable | None:
    """The forward ``pm`` runs instead of its flat graph's code, or None (the flat graph). A service for
    :meth:`PeftModel._graph_forward` (no import circle)."""
    s = _settings(pm)
    if s is None or not s.layered or torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return None
    return _view(pm).forward


def _checkpointing_on(pm: PeftModel) -> bool:
    s = _settings(pm)
    return bool(s is not None and s.layered and s.checkpoint)


def _carry_checkpointing(src: PeftModel, dst: PeftModel) -> None:
    """A copy of ``src`` (``copy.deepcopy``; :meth:`PeftModel.fork`, which merge, unmerge and fold return) keeps
    activation checkpointing when ``src`` has it on, under settings of its own (switching one off leaves the other
    on). Only the flag is carried: the copy builds its own layered view on its first train-mode call, and FSDP2's
    per-block units (``layered(pm, sharded=True)``) are not — a copy's blocks are not FSDP2 units. A service for
    :class:`PeftModel` (no import circle)."""
    if src is dst or not _checkpointing_on(src):
        return
    mine = _settings(dst, create=True)
    mine.layered = mine.checkpoint = True


register_service("layered_forward", _layered_forward)
register_service("gradient_checkpointing", gradient_checkpointing)
register_service("gradient_checkpointing_on", _checkpointing_on)
register_service("carry_checkpointing", _carry_checkpointing)
