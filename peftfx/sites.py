"""Sites: the places in a traced graph where a weight meets an activation.

A site is any matmul one of whose operands is a parameter, whatever module wrapped it:
``aten.linear(x, W[out,in])``, ``aten.addmm(b, x, W[in,out])`` (GPT-2's ``Conv1D``), ``aten.mm``/``aten.matmul``
with a parameter (directly or through a transpose: ``t``, ``numpy_T``, ``transpose``, ``permute``), and ``aten.embedding(W, ids)``. Every site exposes its
weight in one canonical ``[out, in]`` orientation so methods never branch on the op.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = ["Site", "find_sites", "canonical_weight", "site_input", "set_site_input"]

aten = torch.ops.aten

#: kind → how the stored weight relates to the canonical [out, in] matrix
KINDS = ("linear", "linear_t", "embedding")


@dataclass(eq=False)
class Site:
    node: fx.Node
    key: str                     # unique, stable name: module path (plus weight name / call index if shared)
    path: str                    # qualified module path of the module that ran the op
    layer: int | None
    module_type: str
    op: str                      # "linear", "addmm", "mm", "matmul", "embedding"
    kind: str                    # one of KINDS
    weight: str                  # get_attr target of the weight parameter
    weight_shape: tuple[int, ...]
    bias: str | None = None
    roles: set[str] = field(default_factory=set)
    slices: dict[str, tuple[int, int]] = field(default_factory=dict)   # role → output rows (fused QKV)

    @property
    def in_features(self) -> int:
        return self.weight_shape[1] if self.kind == "linear" else self.weight_shape[0]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0] if self.kind == "linear" else self.weight_shape[1]

    @property
    def input(self) -> fx.Node:
        """The activation operand (token ids for an embedding)."""
        return site_input(self.node, self.op)

    def with_roles(self, roles: set[str]) -> "Site":
        return dataclasses.replace(self, roles=set(roles))

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "layer": self.layer, "module_type": self.module_type,
                "op": self.op, "kind": self.kind, "weight": self.weight, "weight_shape": list(self.weight_shape),
                "bias": self.bias,
                "roles": sorted(self.roles), "slices": {k: list(v) for k, v in self.slices.items()}}


_INPUT_INDEX = {"linear": 0, "addmm": 1, "embedding": 1, "mm": 0, "matmul": 0}


def site_input(node: fx.Node, op: str) -> fx.Node:
    """The activation operand of a site node of the given op."""
    return node.args[_INPUT_INDEX[op]]


def set_site_input(node: fx.Node, op: str, new: fx.Node) -> None:
    args = list(node.args)
    args[_INPUT_INDEX[op]] = new
    node.args = tuple(args)


def canonical_weight(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A view of ``weight`` as ``[out, in]`` (in-place updates of the view update the weight)."""
    return weight if kind == "linear" else weight.t()


def _param_attr(gm: fx.GraphModule, node: Any) -> tuple[str, torch.Tensor] | None:
    if isinstance(node, fx.Node) and node.op == "call_module" and "dequant_of" in node.meta.get("peftfx", {}):
        # a quantized base weight (peftfx.quant): the dequantizer stands in for the parameter it replaced
        w = gm.get_submodule(node.target).weight_meta
        return (node.meta["peftfx"]["dequant_of"], w) if w.dim() == 2 else None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        t = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return (node.target, t) if t.dim() == 2 else None


# ``x @ W.t()``, ``x @ W.T`` (numpy_T: Falcon's FalconLinear), ``x @ W.transpose(0, 1)``, ``x @ W.permute(1, 0)``
_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int)


def _match(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str, Any, Any] | None:
    """(op, kind, weight get_attr target, bias target) if ``node`` is a weight matmul."""
    t, a = node.target, node.args
    if t is aten.linear.default:
        w = _param_attr(gm, a[1])
        b = a[2] if len(a) > 2 else None
        return ("linear", "linear", w, b) if w else None
    if t is aten.addmm.default:
        w = _param_attr(gm, a[2])
        return ("addmm", "linear_t", w, a[0]) if w else None
    if t in (aten.mm.default, aten.matmul.default):
        w = _param_attr(gm, a[1])
        if w:
            return (t._opname, "linear_t", w, None)
        src = a[1]
        if isinstance(src, fx.Node) and src.target in _TRANSPOSES:
            w = _param_attr(gm, src.args[0])
            if w and (src.target in (aten.t.default, aten.numpy_T.default) or len(src.args) == 1 or
                      sorted(int(d) % 2 for d in (src.args[1] if src.target is aten.permute.default
                                                  else src.args[1:3])) == [0, 1]):
                return (t._opname, "linear", w, None)
        return None
    if t is aten.embedding.default:
        w = _param_attr(gm, a[0])
        return ("embedding", "embedding", w, None) if w else None
    return None


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every weight matmul in graph order, each with a unique ``key``."""
    found: list[tuple[fx.Node, str, str, str, tuple, Any]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        m = _match(gm, node)
        if m is None:
            continue
        op, kind, (wname, w), bias = m
        found.append((node, op, kind, wname, tuple(w.shape), bias))
    by_path: dict[str, int] = {}
    for node, *_ in found:
        p = _path_of(node)
        by_path[p] = by_path.get(p, 0) + 1
    sites: list[Site] = []
    seen: dict[str, int] = {}
    for node, op, kind, wname, shape, bias in found:
        info = node.meta.get("peftfx", {})
        path = _path_of(node)
        key = path if by_path[path] == 1 else (f"{path}.{wname.rsplit('.', 1)[-1]}" if path else wname)
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n:
            key = f"{key}#{n}"
        bias_name = bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
        sites.append(Site(node=node, key=key, path=path, layer=info.get("layer"),
                          module_type=info.get("module_type", ""), op=op, kind=kind, weight=wname,
                          weight_shape=shape, bias=bias_name))
    return sites


def _path_of(node: fx.Node) -> str:
    return node.meta.get("peftfx", {}).get("path", "")
