"""Remove adapters: cut each named adapter's node out of the graph (an output adapter's uses read the site's
value again, an input adapter's the raw input) and, unless ``keep_modules``, delete its module and record.

Guarantees: no node calls a removed adapter; every other node is unchanged; parameters of the remaining adapters
and of the base are untouched. Used by ``delete_adapter`` (modules go) and by export's base-model fork
(``keep_modules=True`` on a fork: the shared modules stay with the caller's model).
"""
from __future__ import annotations

from typing import Iterable

from torch import fx

from .._util import delete_submodule
from ..model import adapter_nodes
from .base import PassResult, fail, graph_pass
from .splice import adapter_calls

__all__ = ["remove_adapters_pass"]


@graph_pass("remove_adapters")
def remove_adapters_pass(gm: fx.GraphModule, names: Iterable[str] | None = None, *,
                         keep_modules: bool = False) -> PassResult:
    nodes = adapter_nodes(gm.graph)
    names = list(nodes) if names is None else list(names)
    for name in names:
        calls = adapter_calls(gm.graph, name)      # one per call of a site whose module is called several times
        if not calls:
            raise fail("remove_adapters", f"adapter {name} has no node in this graph")
        module = gm.get_submodule(name)
        for node in calls:
            node.replace_all_uses_with(node.args[0] if getattr(module, "position", "output") == "input"
                                       else node.args[1])
            gm.graph.erase_node(node)
        if not keep_modules:
            delete_submodule(gm, name)
            gm.peft_info.adapters.pop(name, None)
    return PassResult(gm, bool(names))
