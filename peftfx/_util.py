"""Small helpers every room uses: submodules by dotted name, a node's tensor value. Internal."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

__all__ = ["find_submodule", "set_submodule", "delete_submodule", "is_tensor_attr", "tensor_val", "call_reading"]


def find_submodule(root: nn.Module, name: str) -> nn.Module | None:
    """``root.get_submodule(name)``, or None when there is no such module."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


def set_submodule(root: nn.Module, name: str, value: Any) -> None:
    """``setattr`` on the parent of dotted ``name`` (a module, parameter or tensor)."""
    holder, attr = _parent(root, name)
    setattr(holder, attr, value)


def delete_submodule(root: nn.Module, name: str) -> None:
    """``delattr`` on the parent of dotted ``name``."""
    holder, attr = _parent(root, name)
    delattr(holder, attr)


def attr_at(root: nn.Module, path: str) -> Any:
    """The attribute at dotted ``path`` under ``root`` (a ``get_attr`` node's target); AttributeError if absent."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def is_tensor_attr(root: nn.Module, path: str) -> bool:
    """True when ``path`` names an attribute of ``root`` that exists and is not a module (a parameter or tensor)."""
    if not path:
        return False
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return not isinstance(obj, nn.Module)


def tensor_val(node: Any) -> torch.Tensor | None:
    """The example value (``meta["val"]``) of a graph node when it is a tensor, else None."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def call_reading(gm: fx.GraphModule, target: Any, weight: torch.Tensor, index: int) -> fx.Node | None:
    """The first ``call_function`` node of op ``target`` whose operand ``index`` is a ``get_attr`` of exactly the
    tensor ``weight``, or None."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is target and len(node.args) > index:
            src = node.args[index]
            if getattr(src, "op", None) == "get_attr":
                try:
                    if gm.get_parameter(src.target) is weight:
                        return node
                except AttributeError:
                    continue
    return None
