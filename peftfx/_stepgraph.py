"""A generation step's graph, run with flat inputs and outputs: the cheap per-token call of ``generate()``.

A graph ``torch.export`` traced with a KV cache among its inputs is a ``GraphModule`` whose code flattens its
inputs (the cache to its key and value tensors) and rebuilds its outputs (a ``ModelOutput`` holding a *new*
cache, which transformers' pytree registration fills by concatenating each layer onto an empty tensor: a copy of
the whole cache per step). :class:`StepGraph` runs the same graph nodes

- with the tensors it reads by ``get_attr`` (weights, buffers, constants) passed as leading arguments, resolved
  once per ``generate()`` call (:meth:`StepGraph.weights`) instead of through module attribute chains per step;
- writing the new key/value tensors into the caller's cache object, as a Hugging Face model's own forward does
  (``DynamicLayer.update`` assigns them); a cache whose layers are not all plain ``DynamicLayer``\\ s, or whose
  layer count differs from the graph's, is rebuilt the ordinary way (pytree unflatten).

The graph's nodes, adapter modules and parameters are the ones of the model's variant (shared, not copied).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree
from torch.fx.graph_module import _forward_from_src
from torch.fx.node import _get_qualified_name
from torch.utils import _pytree as pytree

from ._util import attr_at
from .model import _SERVICES, _fill_constants, call_key

__all__ = ["StepGraph", "run_step", "session_key", "step_graph"]


class StepGraph:
    """``gm``'s nodes compiled as ``f(*weights, *flat_inputs) -> flat_outputs`` (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule):
        info = getattr(gm.graph._codegen, "pytree_info", None)
        if info is None or info.in_spec is None or info.out_spec is None:
            raise ValueError("not a pytree-coded graph")
        self.in_spec, self.out_plan = info.in_spec, _plan(info.out_spec)
        self.code = gm.__dict__.get("_code")
        graph, env, self.attrs = fx.Graph(), {}, []
        for n in gm.graph.nodes:           # weights first, as arguments
            if n.op == "get_attr" and isinstance(attr_at(gm, n.target), torch.Tensor):
                env[n] = graph.placeholder(n.name)
                self.attrs.append(n.target)
        for n in gm.graph.nodes:
            if n in env:
                continue
            if n.op == "output":
                graph.output(fx.map_arg(n.args[0], env.__getitem__))
            else:
                env[n] = graph.node_copy(n, env.__getitem__)
        self.module = fx.GraphModule(gm, graph)          # adapter modules (call_module) shared by reference
        self.forward = _direct_ops(self.module)

    def weights(self, gm: nn.Module) -> list[torch.Tensor]:
        """The tensors the graph reads, from ``gm`` now (call once per ``generate()``: weights do not change
        identity during one)."""
        return [attr_at(gm, t) for t in self.attrs]

    def __call__(self, weights: list[torch.Tensor], kwargs: dict[str, Any], cache: Any) -> Any:
        leaves = fx_pytree.tree_flatten_spec(([], kwargs), self.in_spec)
        out = self.forward(*weights, *leaves)
        return _unflatten(iter(out), self.out_plan, cache)


def step_graph(gm: fx.GraphModule) -> StepGraph | None:
    """The :class:`StepGraph` of ``gm`` (built once per compiled code of ``gm``), or None for a graph without
    pytree-coded inputs and outputs."""
    have = gm.__dict__.get("_peftfx_step")
    if have is not None and have.code is gm.__dict__.get("_code"):
        return have
    try:
        sg = StepGraph(gm)
    except ValueError:
        return None
    gm.__dict__["_peftfx_step"] = sg
    return sg


def _direct_ops(module: fx.GraphModule) -> Any:
    """``module.forward`` with each ATen op called through its C++ entry point: the code FX generates for
    ``torch.ops.aten.mul.Tensor(…)`` looks the op up through four attributes and calls
    ``OpOverload.__call__``, a Python frame that only forwards to ``OpOverload._op``; here the code calls
    ``_op`` itself (the same overload, the same dispatch)."""
    code = module.graph.python_code(root_module="self")
    src, glb = code.src, dict(code.globals)
    ops = {n.target for n in module.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
    for i, op in enumerate(sorted(ops, key=str)):
        qual = _get_qualified_name(op) + "("
        if qual in src:
            src = src.replace(qual, f"_peftfx_op{i}(")
            glb[f"_peftfx_op{i}"] = op._op
    return _forward_from_src(src, glb).__get__(module)       # FX's own compile (source kept for tracebacks)


def _plan(spec: Any) -> Any:
    """``spec`` as nested ``(type, context, unflatten_fn, children)`` (None for a leaf), walked once."""
    if spec.is_leaf():
        return None
    kids = spec.children() if hasattr(spec, "children") else spec.children_specs
    return spec.type, spec.context, pytree.SUPPORTED_NODES[spec.type].unflatten_fn, [_plan(c) for c in kids]


def _unflatten(leaves, plan: Any, cache: Any) -> Any:
    if plan is None:
        return next(leaves)
    kind, context, unflatten_fn, kids = plan
    children = [_unflatten(leaves, c, cache) for c in kids]
    if cache is not None and kind is type(cache):
        filled = _into(cache, context, children)
        if filled is not None:
            return filled
    return unflatten_fn(children, context)


def _into(cache: Any, context: Any, children: list) -> Any:
    """Write a flattened ``DynamicCache`` (transformers' layout: ``[names, layout]`` context, one list of keys
    and one of values) into ``cache``'s own ``DynamicLayer``\\ s; None when they do not fit that plainly."""
    from transformers.cache_utils import DynamicLayer

    try:
        names, _ = context
        parts = dict(zip(names, children))
        keys, values = parts["key_cache"], parts["value_cache"]
    except (TypeError, ValueError, KeyError):
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or len(keys) != len(layers) or len(values) != len(layers) \
            or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    for layer, k, v in zip(layers, keys, values):
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def run_step(gm: fx.GraphModule, kwargs: dict[str, Any], session: dict) -> Any:
    """``gm(**kwargs)`` as a :class:`StepGraph` with the weights resolved once per ``session`` (one
    ``generate()`` call). A graph running its layered view (activation checkpointing, FSDP2 units:
    :mod:`peftfx.layers`) or with forward hooks of its own (or global ones) runs as an ordinary module call, so
    those hooks still run."""
    layered = _SERVICES.get("layered_forward")
    if _hooked(gm) or (layered is not None and layered(gm) is not None):
        return gm(**kwargs)
    sg = step_graph(gm)
    if sg is None:
        return gm(**kwargs)
    have = session.get(id(sg))
    if have is None or have[0] is not sg:
        have = session[id(sg)] = (sg, sg.weights(gm))
    cache = next((v for v in kwargs.values() if isinstance(getattr(v, "layers", None), list)), None)
    return sg(have[1], kwargs, cache)


def _hooked(gm: nn.Module) -> bool:
    from torch.nn.modules import module as m

    pre = [h for h in gm._forward_pre_hooks.values() if h is not _fill_constants]
    return bool(pre or gm._forward_hooks or m._global_forward_pre_hooks or m._global_forward_hooks
                or m._global_forward_hooks_always_called)


def session_key(session: dict | None, kwargs: dict[str, Any], training: bool, dynamic: bool) -> tuple:
    """``call_key(kwargs, training, dynamic)``, remembered in a ``generate()`` session under a cheaper fingerprint
    that determines it: per input the tensor description ``call_key`` uses, a constant's value, and for a
    ``DynamicCache`` each layer's type, window and key/value tensor descriptions (which fix its pytree structure
    and leaves). Inputs of other kinds are not fingerprinted: the key is computed each call."""
    if session is None:
        return call_key(kwargs, training, dynamic)
    parts: list = [training, dynamic]
    for name, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            parts.append((name, _describe(v, dynamic)))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            parts.append((name, type(v), v))
        elif _dynamic_cache(v):
            parts.append((name, type(v), tuple((type(layer), getattr(layer, "sliding_window", None),
                                                _describe(getattr(layer, "keys", None), dynamic),
                                                _describe(getattr(layer, "values", None), dynamic))
                                               for layer in v.layers)))
        else:
            return call_key(kwargs, training, dynamic)
    fp = ("key", tuple(parts))
    key = session.get(fp)
    if key is None:
        key = session[fp] = call_key(kwargs, training, dynamic)
    return key


def _dynamic_cache(v: Any) -> bool:
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:            # pragma: no cover - without transformers there is no such cache
        return False
    return type(v) is DynamicCache


def _describe(t: Any, dynamic: bool) -> Any:
    if not isinstance(t, torch.Tensor):
        return type(t)
    return (t.dim(), t.dtype, t.device, tuple(t.shape) if not dynamic else tuple(d == 1 for d in t.shape[1:]))
