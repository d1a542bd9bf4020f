"""Freeze: every parameter that no adapter module owns gets ``requires_grad=False``; adapter parameters
get ``True``. Base tensors are neither copied nor moved."""
from __future__ import annotations

from .base import PassResult, graph_pass
from .checks import only_adapters_train

__all__ = ["freeze_pass"]


@graph_pass("freeze", ensures=[only_adapters_train])
def freeze_pass(gm) -> PassResult:
    train = {id(p) for name in gm.peft_info.adapters for p in gm.get_submodule(name).parameters()}
    for p in gm.parameters():
        p.requires_grad_(id(p) in train)
    return PassResult(gm, False)
