"""Rewrite: the graph-level methods' edits (prompt tuning, p-tuning, prefix tuning) applied to the graph.

Each item is ``(rule, prepared edit, modules)``: the rule's ``GraphMethod.prepare`` validated the edit during
planning and ``build_graph`` built its modules; here ``rule.rewrite(gm, edit, modules)`` registers the modules
and changes the graph. Runs after the site adapters are spliced and before freezing. Guarantees: the graph
lints (a failure names this pass and the method), and each rule's modules are submodules of the result.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import fx, nn

from .._util import find_submodule
from .base import PassResult, fail, graph_pass
from .checks import adapters_called_once

__all__ = ["rewrite_pass"]


@graph_pass("rewrite", ensures=[adapters_called_once])
def rewrite_pass(gm: fx.GraphModule, items: Sequence[tuple[Any, Any, dict[str, nn.Module]]]) -> PassResult:
    for rule, edit, modules in items:
        rule.rewrite(gm, edit, modules)
        missing = [name for name in modules if find_submodule(gm, name) is None]
        if missing:
            raise fail("rewrite", f"method {rule.name} did not register its module(s) {missing}")
    return PassResult(gm, bool(items))
