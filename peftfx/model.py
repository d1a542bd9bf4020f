"""The module peftfx returns: an ``fx.GraphModule`` that behaves like the model it came from.

``PeftModel`` is an ordinary ``nn.Module``: ``train()``/``eval()`` switch dropout (the graph's dropout and
attention-dropout arguments are rewritten by :func:`~peftfx.passes.dropout.dropout_mode_pass` when the mode
changes), ``.to()`` moves parameters and rewrites device constants frozen into the graph at trace time
(:func:`~peftfx.passes.device.device_pass`), ``state_dict()`` has the
original model's keys plus the adapters', and DDP wraps it like any module.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ._errors import PeftfxError
from ._util import find_submodule, is_tensor_attr

__all__ = ["PeftModel", "PeftInfo", "AdapterRecord", "require_peft", "adapter_name", "adapter_of", "adapter_nodes", "output_chain",
           "chain_end"]


@dataclass
class AdapterRecord:
    """One adapter module spliced into the graph (or merged into a weight)."""

    name: str                 # submodule name in the PeftModel, e.g. "model.layers.0.self_attn.q_proj.lora"
    method: str               # registry name, e.g. "lora"
    rule_index: int           # which rule of ``PeftInfo.rules`` put it there
    site: dict[str, Any]      # Site.describe(): path, role, layer, kind, weight name and shape …
    node: str = ""            # the graph node the adapter acts on (site node name)
    merged: bool = False      # folded into the weight; its node is gone but its parameters are kept


@dataclass
class PeftInfo:
    input_names: list[str] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    rules: list[Any] = field(default_factory=list)
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    base_node_count: int = 0
    multi: dict[str, Any] = field(default_factory=dict)   # named adapters (peftfx.multi): adapters, active


class PeftModel(fx.GraphModule):
    """A traced model with adapters. Build it with :func:`peftfx.apply` or :func:`peftfx.trace`."""

    def __init__(self, root: nn.Module | dict, graph: fx.Graph, class_name: str = "PeftModel"):
        super().__init__(root, graph, class_name)
        self.peft_info = PeftInfo()
        self._graph_mode: bool | None = None
        self.register_forward_pre_hook(_fill_constants, with_kwargs=True)

    # ----------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "PeftModel":
        super().train(mode)
        if self._graph_mode is not mode:
            from .passes.dropout import dropout_mode_pass

            dropout_mode_pass(self, mode)
            self._graph_mode = mode
        return self

    # ---------------------------------------------------------------------------------------- device
    def _apply(self, fn, recurse: bool = True):  # called by .to(), .cuda(), .half(), to_empty() …
        out = super()._apply(fn, recurse)
        device = next((p.device for p in self.parameters()), None)
        if device is not None and device != self.peft_info.device:
            self._rewrite_devices(device)
        return out

    def _rewrite_devices(self, device: torch.device) -> None:
        """Device constants frozen at trace time (``arange(device=cpu)``, ``.to(cpu)``) follow the weights."""
        from .passes.device import device_pass

        device_pass(self, self.peft_info.device, device)
        self.peft_info.device = device

    # ------------------------------------------------------------------------------------------ copy
    def fork(self, graph: fx.Graph | None = None) -> "PeftModel":
        """A new PeftModel over a copy of this graph, sharing every parameter and adapter module.

        Passes that must not touch the caller's model (merge, unmerge) work on a fork."""
        if graph is None:
            graph = fx.Graph()
            out = graph.graph_copy(self.graph, {})
            graph.output(out)
            graph._codegen = copy.deepcopy(self.graph._codegen)
            for new in graph.nodes:
                if "peftfx" in new.meta:
                    new.meta["peftfx"] = copy.deepcopy(new.meta["peftfx"])
        twin = PeftModel(self, graph, class_name=type(self).__name__.replace("GraphModuleImpl", "PeftModel"))
        for name in self.peft_info.adapters:
            if find_submodule(twin, name) is None:
                twin.add_submodule(name, self.get_submodule(name))
        twin.peft_info = copy.deepcopy(self.peft_info)
        twin.train(self.training)
        return twin

    def __deepcopy__(self, memo: dict) -> "PeftModel":
        """``copy.deepcopy`` keeps what ``GraphModule.__deepcopy__`` drops: ``peft_info``, the forward hooks
        (input constants, QLoRA recompute) and the train/eval state of the graph."""
        res = super().__deepcopy__(memo)
        res.peft_info = copy.deepcopy(self.peft_info, memo)
        res._graph_mode = self._graph_mode
        for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(self, attr):
                setattr(res, attr, type(getattr(self, attr))(getattr(self, attr)))
        if getattr(self, "_peftfx_recompute", None) is not None:
            res._peftfx_recompute = []
        res.training = self.training
        return res

    def adapter_modules(self) -> dict[str, nn.Module]:
        return {name: self.get_submodule(name) for name in self.peft_info.adapters}


def _fill_constants(module: "PeftModel", args: tuple, kwargs: dict):
    """Non-tensor inputs fixed at trace time (``use_cache=False``) may be omitted; a different value is an
    error because the graph cannot honour it."""
    info = module.peft_info
    if not info.constants and len(args) <= len(info.input_names):
        return None
    kwargs = dict(kwargs)
    for name, value in zip(info.input_names, args):
        if name in kwargs:
            raise TypeError(f"got multiple values for argument '{name}'")
        kwargs[name] = value
    for name, value in info.constants.items():
        if name in kwargs and kwargs[name] != value:
            raise ValueError(f"the model was traced with {name}={value!r}; the graph cannot run with "
                             f"{name}={kwargs[name]!r}. Trace again with example_inputs containing "
                             f"{name}={kwargs[name]!r}.")
        kwargs[name] = value
    return (), kwargs


# ------------------------------------------------------------------------------------ adapter queries
def require_peft(model: Any, what: str) -> None:
    """The one check (and phrasing) for API functions that need a model returned by :func:`peftfx.apply`."""
    if not isinstance(model, PeftModel):
        raise PeftfxError(f"{what}() takes a model returned by peftfx.apply() or peftfx.trace(), got "
                          f"{type(model).__name__}.")


def adapter_name(root: nn.Module, key: str, method: str) -> str:
    """The one naming rule for adapter modules: ``{site key}.{method}`` (``model.layers.0.q_proj.lora``); a call
    index ``#2`` becomes ``_call2``; when the key names a tensor (a parameter used directly), ``{key}_{method}``."""
    key = key.replace("#", "_call")
    if not key:
        return method
    return f"{key}_{method}" if is_tensor_attr(root, key) else f"{key}.{method}"


def adapter_of(node: fx.Node) -> str | None:
    """The adapter a ``call_module`` node calls (its name), or None for any other node."""
    if node.op != "call_module":
        return None
    return node.meta.get("peftfx", {}).get("adapter")


def adapter_nodes(graph: fx.Graph) -> dict[str, fx.Node]:
    """Adapter name → the node that calls it."""
    return {name: n for n in graph.nodes if (name := adapter_of(n)) is not None}


def output_chain(site_node: fx.Node) -> list[fx.Node]:
    """The output adapters spliced after a site, in order: each ``m(x, y)`` reads the previous value as ``y``
    and is that value's only user."""
    chain, node = [], site_node
    while len(node.users) == 1:
        user = next(iter(node.users))
        if adapter_of(user) is None or len(user.args) < 2 or user.args[1] is not node:
            break
        chain.append(user)
        node = user
    return chain


def chain_end(site_node: fx.Node) -> fx.Node:
    """The last output adapter after a site, or the site itself."""
    chain = output_chain(site_node)
    return chain[-1] if chain else site_node
