"""Pre- and postconditions shared by passes (``graph_pass(requires=…, ensures=…)``): each returns None when the
condition holds, else a sentence naming what is wrong."""
from __future__ import annotations

from collections import Counter

from torch import fx

from ..sites import site_calls

__all__ = ["adapters_called_once", "merged_adapters_have_no_node", "only_adapters_train"]


def _adapter_calls(gm: fx.GraphModule) -> Counter:
    return Counter(n.meta["peftfx"]["adapter"] for n in gm.graph.nodes
                   if n.op == "call_module" and "adapter" in n.meta.get("peftfx", {}))


def adapters_called_once(gm: fx.GraphModule) -> str | None:
    """Each adapter is called once per call of its site: once, or at each call of a module called several times
    (one site with several nodes, :func:`peftfx.sites.site_calls`)."""
    twice = sorted(name for name, k in _adapter_calls(gm).items() if k > 1 and not _one_per_call(gm, name))
    return f"adapter(s) {twice[:3]} are called by more than one node" if twice else None


def _one_per_call(gm: fx.GraphModule, name: str) -> bool:
    """Whether the nodes calling adapter ``name`` sit one each at distinct calls of one shared site."""
    at = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.meta.get("peftfx", {}).get("adapter") == name:
            site = _site_of(n)
            if site is None:
                return False
            at.append(site)
    if len(set(at)) != len(at):
        return False
    calls = site_calls(gm, at[0])
    return all(a in calls for a in at)


def _site_of(node: fx.Node) -> fx.Node | None:
    """The site node an adapter node acts on: behind the output-adapter chain (``m(x, y)``), or the site that reads
    an input adapter's output."""
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        y = node.args[1]
        while y.op == "call_module" and len(y.args) > 1 and isinstance(y.args[1], fx.Node):
            y = y.args[1]
        return y
    users = list(node.users)
    while len(users) == 1 and users[0].op == "call_module":      # through further input adapters
        users = list(users[0].users)
    return users[0] if len(users) == 1 and users[0].op == "call_function" else None


def merged_adapters_have_no_node(gm: fx.GraphModule) -> str | None:
    info = getattr(gm, "peft_info", None)
    if info is None:
        return None
    calls = _adapter_calls(gm)
    live = sorted(name for name, rec in info.adapters.items() if rec.merged and calls.get(name))
    return f"adapter(s) {live[:3]} are merged into their weights but still called in the graph" if live else None


def only_adapters_train(gm: fx.GraphModule) -> str | None:
    info = getattr(gm, "peft_info", None)
    if info is None:
        return None
    adapter = {id(p) for name in info.adapters for p in gm.get_submodule(name).parameters()}
    base = [n for n, p in gm.named_parameters() if p.requires_grad and id(p) not in adapter]
    return f"base parameter(s) {base[:3]} require grad" if base else None
