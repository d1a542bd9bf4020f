"""An in-process cache of ``torch.export`` graphs, so a second model of the same architecture is not traced again.

``torch.export`` is 90 % of ``apply()``'s time, and every ``apply``, ``load_adapter`` and CLI call on a model of the
same class, config and input spec would pay it again for an identical graph. The cache keeps, per key, the
exported graph (``fx.Graph``, its pytree calling convention and node metadata) and the few tensor constants that
belong to the graph rather than to the model (``get_attr`` targets the model does not have). It never holds the
first model's parameters: on a hit the graph is copied and bound to the *new* model's own tensors by name, exactly
as ``ep.module()`` binds the traced model's (the exported ``get_attr`` targets are the model's parameter and buffer
names, tied weights included).

Key (everything the graph can depend on): the model's class; its Hugging Face config (``to_dict()``, and the
attention/experts implementation), which determines every shape and every branch of transformers' model code;
its module tree (path → class, train flag, gradient checkpointing) and every parameter and buffer (name, shape, dtype, device type); the train/eval
mode; the input spec (names, dtypes, ranks, and the values of non-tensor inputs); ``dynamic``; and the torch and
transformers versions. Only models with such a config are cached: a plain ``nn.Module`` may branch on attributes
no key can see, so it is always traced. Batch and sequence sizes are not in the key when ``dynamic=True`` (the graph
is symbolic in them); with ``dynamic=False`` the shapes are.

``PEFTFX_TRACE_CACHE=0`` turns the cache off; :func:`clear` empties it; :func:`info` counts hits and misses.
At most :data:`MAX_ENTRIES` graphs are kept (least recently used first out).
"""
from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

__all__ = ["cached_export", "clear", "info", "MAX_ENTRIES"]

MAX_ENTRIES = 16


@dataclass
class _Entry:
    graph: fx.Graph
    constants: dict[str, torch.Tensor]


_CACHE: "OrderedDict[str, _Entry]" = OrderedDict()
_STATS = {"hits": 0, "misses": 0, "uncached": 0}


def clear() -> None:
    """Forget every cached graph (and the counts)."""
    _CACHE.clear()
    _STATS.update(hits=0, misses=0, uncached=0)


def info() -> dict[str, int]:
    """``{"hits", "misses", "uncached", "entries"}`` since the last :func:`clear`."""
    return dict(_STATS, entries=len(_CACHE))


def _enabled() -> bool:
    return os.environ.get("PEFTFX_TRACE_CACHE", "1") not in ("0", "false", "off", "")


def _config_key(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    try:
        data = to_dict()
    except Exception:          # a config that cannot describe itself: do not cache
        return None
    extras = {k: getattr(config, k, None) for k in ("_attn_implementation", "_experts_implementation")}
    extras["model_experts"] = getattr(model, "_experts_implementation", None)
    return json.dumps([data, extras], sort_keys=True, default=repr)


def _input_key(kwargs: dict[str, Any], dynamic: bool) -> list:
    from torch.utils import _pytree as pytree

    out = []
    for name, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            shape = [v.dim()] if dynamic else list(v.shape)
            out.append([name, "tensor", str(v.dtype), v.device.type, shape])
        elif type(v) in pytree.SUPPORTED_NODES and type(v) not in (list, tuple, dict):
            leaves, spec = pytree.tree_flatten(v)       # a container input (a KV cache): its structure and leaves
            out.append([name, "tree", str(spec), [[str(t.dtype), t.dim() if dynamic else list(t.shape),
                                                   [d == 1 for d in t.shape[1:]]]
                                                  for t in leaves if isinstance(t, torch.Tensor)]])
        else:
            out.append([name, "value", repr(v)])
    return out


def key_of(model: nn.Module, kwargs: dict[str, Any], dynamic: bool) -> str | None:
    """The cache key for tracing ``model`` on ``kwargs``, or None when the model cannot be cached."""
    config = _config_key(model)
    if config is None:
        return None
    import transformers

    tensors = [[n, list(t.shape), str(t.dtype), t.device.type]
               for n, t in list(model.named_parameters(remove_duplicate=False))
               + list(model.named_buffers(remove_duplicate=False))]
    tree = [[n, type(m).__module__ + "." + type(m).__qualname__, m.training,
             bool(getattr(m, "gradient_checkpointing", False))] for n, m in model.named_modules()]
    return json.dumps([type(model).__module__ + "." + type(model).__qualname__, config, tree, tensors,
                       model.training, _input_key(kwargs, dynamic), dynamic, torch.__version__,
                       transformers.__version__], default=repr)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def _bind(model: nn.Module, entry: _Entry) -> tuple[dict[str, torch.Tensor], fx.Graph]:
    """A copy of the cached graph and its ``get_attr`` targets bound to ``model``'s own tensors (by name)."""
    tensors = {}
    for node in entry.graph.nodes:
        if node.op == "get_attr":
            t = _lookup(model, node.target)
            tensors[node.target] = entry.constants[node.target] if t is None else t
    return tensors, _copy_graph(entry.graph)


def _lookup(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def _register(root: nn.Module, target: str, t: torch.Tensor) -> None:
    *path, attr = target.split(".")
    mod = root
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if isinstance(t, nn.Parameter):
        mod.register_parameter(attr, t)
    else:
        mod.register_buffer(attr, t)


def cached_export(model: nn.Module, kwargs: dict[str, Any], dynamic: bool,
                  export: Callable[[], fx.GraphModule]) -> tuple[nn.Module | dict[str, torch.Tensor], fx.Graph]:
    """``(root, graph)`` for a GraphModule: ``export()``'s (which runs ``torch.export`` and returns ``ep.module()``),
    or, when a model with the same key was exported before in this process, a copy of the cached graph and its
    ``get_attr`` targets (name → ``model``'s own tensor)."""
    key = key_of(model, kwargs, dynamic) if _enabled() else None
    if key is None:
        _STATS["uncached"] += 1
        gm = export()
        return gm, gm.graph
    entry = _CACHE.get(key)
    if entry is not None:
        _CACHE.move_to_end(key)
        _STATS["hits"] += 1
        return _bind(model, entry)
    _STATS["misses"] += 1
    gm = export()
    graph = _copy_graph(gm.graph)
    constants = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)                 # torch.export's input guards; the cleanup pass drops them too
        elif node.op == "call_module":
            return gm, gm.graph                    # a graph that calls modules of its own: not cacheable
        elif node.op == "get_attr" and _lookup(model, node.target) is None:
            value = _lookup(gm, node.target)
            if value is None:
                return gm, gm.graph
            constants[node.target] = value.detach().clone()
    _CACHE[key] = _Entry(graph, constants)
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return gm, gm.graph
