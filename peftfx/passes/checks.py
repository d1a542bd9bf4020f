"""Pre- and postconditions shared by passes (``graph_pass(requires=…, ensures=…)``): each returns None when the
condition holds, else a sentence naming what is wrong."""
from __future__ import annotations

from collections import Counter

from torch import fx

__all__ = ["adapters_called_once", "merged_adapters_have_no_node", "only_adapters_train"]


def _adapter_calls(gm: fx.GraphModule) -> Counter:
    return Counter(n.meta["peftfx"]["adapter"] for n in gm.graph.nodes
                   if n.op == "call_module" and "adapter" in n.meta.get("peftfx", {}))


def adapters_called_once(gm: fx.GraphModule) -> str | None:
    twice = sorted(name for name, k in _adapter_calls(gm).items() if k > 1)
    return f"adapter(s) {twice[:3]} are called by more than one node" if twice else None


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
