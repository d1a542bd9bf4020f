"""Quantize / dequantize passes: swap a base weight's ``get_attr`` for a dequantizer ``call_module`` and back.

``quantize_weights_pass`` guarantees: for each weight name, every ``get_attr`` node reading that parameter
(or a tied alias of it — the same tensor under another name) now reads ``call_module(<name>_nf4|_int8)``,
placed just before the node's first user
whose output equals the dequantized weight, with ``node.meta["peftfx"]["dequant_of"]`` set to the name the
node read; the float parameter is removed from this module (one weight at a time, so peak memory holds one
float weight beyond the quantized model). ``dequantize_weights_pass`` is the inverse: each named weight
becomes a float parameter again (the dequantized values) read by ``get_attr``; the dequantizer is dropped.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn

from .._util import set_submodule
from .base import PassResult, fail, graph_pass

__all__ = ["quantize_weights_pass", "dequantize_weights_pass", "dequant_nodes", "SUFFIX"]

SUFFIX = {4: "_nf4", 8: "_int8"}


def _readers(gm: fx.GraphModule, tensor: torch.Tensor) -> list[fx.Node]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                if gm.get_parameter(n.target) is tensor:
                    out.append(n)
            except AttributeError:
                continue
    return out


def _drop_attr(gm: nn.Module, name: str) -> None:
    parent, _, attr = name.rpartition(".")
    holder = gm.get_submodule(parent) if parent else gm
    if hasattr(holder, attr):
        delattr(holder, attr)


@graph_pass("quantize")
def quantize_weights_pass(gm: fx.GraphModule, names: list[str], make: Callable[[str], nn.Module],
                          bits: int) -> PassResult:
    for name in names:
        try:
            tensor = gm.get_parameter(name)
        except AttributeError:
            raise fail("quantize", f"{name} is not a parameter of the model (already quantized?)") from None
        readers = _readers(gm, tensor)
        if not readers:
            raise fail("quantize", f"no get_attr node reads {name}")
        qname = name + SUFFIX[bits]
        gm.add_submodule(qname, make(name))
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for node in readers:
            # just before the first reader, not where export put the get_attr (the top of the graph): a
            # dequantized weight lives only while it is used, not the whole forward
            first = min(node.users, key=order.__getitem__) if node.users else node
            with gm.graph.inserting_before(first):
                new = gm.graph.call_module(qname, ())
            new.meta = dict(node.meta)
            new.meta["peftfx"] = {**node.meta.get("peftfx", {}), "dequant_of": node.target}
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        for alias in {n.target for n in readers}:
            _drop_attr(gm, alias)
        del tensor
    return PassResult(gm, bool(names))


def dequant_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and "dequant_of" in n.meta.get("peftfx", {})]


@graph_pass("dequantize")
def dequantize_weights_pass(gm: fx.GraphModule, names: set[str]) -> PassResult:
    """``names``: weight names (``dequant_of``) to turn back into float parameters."""
    made: dict[str, nn.Parameter] = {}
    modified = False
    for node in dequant_nodes(gm):
        name = node.meta["peftfx"]["dequant_of"]
        if name not in names:
            continue
        if node.target not in made:
            with torch.no_grad():
                made[node.target] = nn.Parameter(gm.get_submodule(node.target)().clone(), requires_grad=False)
        set_submodule(gm, name, made[node.target])
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(name)
        new.meta = dict(node.meta)
        new.meta["peftfx"] = {k: v for k, v in node.meta.get("peftfx", {}).items() if k != "dequant_of"}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    for target in made:
        if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            _drop_attr(gm, target)
    missing = names - {n for n in names if any(gm.graph.find_nodes(op="get_attr", target=n))}
    if missing:
        raise fail("dequantize", f"no quantized weight named {sorted(missing)}")
    return PassResult(gm, modified)
