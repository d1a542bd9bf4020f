"""Fold: evaluate every input-independent adapter computation once and store the results as constants.

A node is *constant* when no graph input reaches it: parameters and buffers (``get_attr``), and any pure node
whose inputs are all constant — e.g. the source modules of the virtual-token methods (prompt tuning's
embeddings, p-tuning's prompt encoder, prefix tuning's table or reparameterisation MLP, called with no inputs)
and the per-layer slicing of their output. Among the constant nodes, those that depend on an adapter module
are evaluated once (adapters in eval mode, without autograd), and each one a non-constant node reads is
replaced by a ``get_attr`` of a buffer holding its value; the nodes that fed only them are erased, and adapter
modules no node calls any more are removed with their records — so the folded graph runs no prompt encoder
and holds no encoder weights (an ONNX export of it neither). Base-model constants are left alone.

Guarantees: outputs equal the unfolded model's in eval mode (the same tensors, computed once); ``fold_pass``
is functional by default and returns a fork (the caller's model, its modules and parameters are untouched).
The folded constants are buffers: they do not train. Fold for inference and export; save and train the
unfolded model (``save_adapter`` on a folded model no longer sees the folded adapters).
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from .._util import delete_submodule
from .base import PassResult, graph_pass

__all__ = ["fold_pass"]

log = logging.getLogger(__name__)

_RANDOM = {torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default,
           torch.ops.aten.bernoulli.default, torch.ops.aten.rand.default, torch.ops.aten.randn.default}


def _adapter_of(target: str, adapters) -> str | None:
    for name in adapters:
        if target == name or target.startswith(name + "."):
            return name
    return None


def _pure(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_module", "call_method", "get_attr"):
        return False
    if node.op == "call_function":
        if node.target in _RANDOM or node.is_impure():
            return False
        tags = getattr(node.target, "tags", ())
        return torch.Tag.nondeterministic_seeded not in tags
    return True


def _constants(gm) -> tuple[set[fx.Node], dict[fx.Node, str]]:
    """(constant nodes, constant node → the adapter it depends on) for the nodes that depend on an adapter."""
    adapters = gm.peft_info.adapters
    const: set[fx.Node] = set()
    owner: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if not _pure(node) or any(a not in const for a in node.all_input_nodes):
            continue
        const.add(node)
        if node.op in ("call_module", "get_attr"):
            name = _adapter_of(str(node.target), adapters)
            if name is not None:
                owner[node] = name
        if node not in owner:
            upstream = [owner[a] for a in node.all_input_nodes if a in owner]
            if upstream:
                owner[node] = upstream[0]
    return const, owner


def _evaluate(gm, nodes: list[fx.Node], owners: set[str]) -> dict[fx.Node, object]:
    interp = fx.Interpreter(gm)
    modules = [gm.get_submodule(n) for n in owners]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            for node in nodes:
                interp.env[node] = interp.run_node(node)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return interp.env


def _buffer_name(gm, adapter: str) -> str:
    base = adapter.replace(".", "_") + "_folded"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


@graph_pass("fold", functional=True)
def fold_pass(gm, inplace: bool = False) -> PassResult:
    out = gm if inplace else gm.fork()
    const, owner = _constants(out)
    frontier = [n for n in out.graph.nodes if n in owner and
                any(u not in const or u.op == "output" for u in n.users)]
    if not frontier:
        log.info("fold: no input-independent adapter computation to fold")
        return PassResult(out, False)
    needed = set(frontier)
    for node in reversed(out.graph.nodes):
        if node in needed:
            needed.update(node.all_input_nodes)
    env = _evaluate(out, [n for n in out.graph.nodes if n in needed], set(owner.values()))
    folded = set()
    for node in frontier:
        value = env[node]
        if not isinstance(value, torch.Tensor):
            log.info("fold: %s does not produce a tensor; left in the graph", node.name)
            continue
        name = _buffer_name(out, owner[node])
        out.register_buffer(name, value.detach().clone())
        with out.graph.inserting_before(node):
            attr = out.graph.get_attr(name)
        attr.meta = {"val": node.meta.get("val"), "peftfx": {"path": "", "layer": None, "module_type": "",
                                                              "folded_from": owner[node]}}
        node.replace_all_uses_with(attr)
        folded.add(owner[node])
    for node in reversed(out.graph.nodes):
        if node in needed and not node.users:
            out.graph.erase_node(node)
    _drop_unused(out, folded)
    return PassResult(out, True)


def _drop_unused(gm, folded: set[str]) -> None:
    """Remove folded adapters that no node uses any more (module and record)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name in folded:
        if any(t == name or t.startswith(name + ".") for t in used):
            continue
        delete_submodule(gm, name)
        del gm.peft_info.adapters[name]
        log.info("fold: %s is folded into constants; its module is removed", name)
