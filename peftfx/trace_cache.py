"""In-process caches, so a second model of the same architecture is neither traced nor planned again.

**Trace cache.** ``torch.export`` is 90 % of a cold ``apply()``, and every ``apply``, ``load_adapter`` and CLI call on
a model of the same class, config and input spec would pay it again for an identical graph. The cache keeps, per
key, the exported graph (``fx.Graph``, its pytree calling convention and node metadata) and the few tensor constants
that belong to the graph rather than to the model (``get_attr`` targets the model does not have; cloned per hit).
It never holds the first model's parameters: on a hit the graph is copied and bound to the *new* model's own
tensors by name, exactly as ``ep.module()`` binds the traced model's (the exported ``get_attr`` targets are the
model's parameter and buffer names, tied weights included).

Key (everything the graph can depend on): the model's class; its config — a Hugging Face config (``to_dict()``, and
the attention/experts implementation), which determines every shape and every branch of transformers' model code,
or a diffusers ``FrozenDict`` config (the constructor's arguments) together with every module's own attributes
(attention processors and what ``set_*`` methods change after construction); its module tree (path → class, train
flag, gradient checkpointing) and every parameter and buffer (name, shape, dtype, device, which are tied); the
input spec (names, dtypes, ranks and which non-batch sizes are 1, and the values of non-tensor inputs);
``dynamic``; the trace switches (``PEFTFX_TRACE_REPLICATE``, ``PEFTFX_SYMBOLIC_TRACE``); the torch and
transformers versions. Only models with such a config are cached: a plain ``nn.Module`` may branch on attributes
no key can see, so it is always traced. Batch and sequence sizes are not in the key when ``dynamic=True`` (the graph
is symbolic in them; inputs with a size-1 sequence, which a trace keeps static, also take a graph symbolic in
it); with ``dynamic=False`` the shapes are.

**Apply's cache** (second level, :class:`Applied`; filled and read by :func:`peftfx.apply`). Keyed by the trace key
of the model as it is (train/eval flags included), the mode traced in and every rule's class and fields
(:func:`rules_key`), it keeps what ``apply`` made: the graph after every pass, its generated code (the function
object itself: the same source compiles to the same code, and it reads everything through ``self``), the module
tree layout and, per adapter, the site, roles and rule that built it. A hit builds the result for the new model
without tracing, planning, passes or code generation: the model's own tensors at the same paths, in the same order;
adapter modules built anew by the same ``build`` calls in the same order (the same random draws as a cold apply);
the cached graph shared read-only until the model first needs a graph (a pass, a variant, export, deepcopy), when
the model takes its own copy (:meth:`peftfx.model.PeftModel.share_graph`). Only results it can rebuild are kept:
methods whose ``build`` reads the site's description, the weight and the roles only (LoRA, DoRA, IA3, Houlsby), no
graph-level edit, no ``fill`` (checkpoint loading), and no state on the model beyond what ``apply`` sets.

``PEFTFX_TRACE_CACHE=0`` turns both off, ``PEFTFX_APPLY_CACHE=0`` the second only; :func:`clear` empties both;
:func:`info` counts hits and misses. At most :data:`MAX_ENTRIES` entries of each are kept (least recently used first
out).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from ._graphcopy import _copy_graph, copy_graph
from .passes.cleanup import droppable

__all__ = ["cached_export", "clear", "info", "MAX_ENTRIES", "Applied", "assemble", "copy_graph", "key_of"]

MAX_ENTRIES = 16


@dataclass
class _Entry:
    graph: fx.Graph
    constants: dict[str, torch.Tensor]
    #: the rule-independent analysis of the graphs this entry gives (sites, roles, modules without a site), as
    #: :func:`peftfx.plan.plan` found it on the first hit: fingerprint → frozen analysis (see :func:`analysis_slot`)
    analysis: dict[Any, Any] = field(default_factory=dict)


_CACHE: "OrderedDict[str, _Entry]" = OrderedDict()
_STATS = {"hits": 0, "misses": 0, "uncached": 0, "applied_hits": 0, "applied_entries_made": 0}


def clear() -> None:
    """Forget every cached graph (and the counts)."""
    _CACHE.clear()
    _APPLIED.clear()
    _STATS.update(dict.fromkeys(_STATS, 0))


def info() -> dict[str, int]:
    """``{"hits", "misses", "uncached", "entries"}`` of the trace cache and ``{"applied_hits",
    "applied_entries_made", "applied_entries"}`` of ``apply``'s cache, since the last :func:`clear`."""
    return dict(_STATS, entries=len(_CACHE), applied_entries=len(_APPLIED))


def _enabled() -> bool:
    return os.environ.get("PEFTFX_TRACE_CACHE", "1") not in ("0", "false", "off", "")


def _config_key(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):                    # a Hugging Face transformers config
        try:
            data = to_dict()
        except Exception:          # a config that cannot describe itself: do not cache
            return None
        extras = {k: getattr(config, k, None) for k in ("_attn_implementation", "_experts_implementation")}
        extras["model_experts"] = getattr(model, "_experts_implementation", None)
        return json.dumps([data, extras], sort_keys=True, default=repr)
    if isinstance(config, Mapping) and type(config).__name__ == "FrozenDict":
        # a diffusers model: its config is the constructor's arguments (a FrozenDict, no to_dict), and what is set
        # after construction lives in module attributes (attention processors, forward chunking, slicing …)
        return json.dumps([dict(config), _attributes(model)], sort_keys=True, default=repr)
    return None


_SIMPLE = (bool, int, float, str, type(None))


def _attributes(model: nn.Module) -> list:
    """Every module's own attributes (not its parameters, buffers, children or hooks): a plain value as it is, a
    tensor by shape and dtype, any other object by its class and its plain values (an attention processor)."""
    def value(v: Any, depth: int = 0) -> Any:
        if isinstance(v, _SIMPLE):
            return v
        if isinstance(v, torch.Tensor):
            return ["tensor", list(v.shape), str(v.dtype)]
        if isinstance(v, (list, tuple)) and depth < 2:
            return [value(x, depth + 1) for x in v]
        if isinstance(v, Mapping) and depth < 2:
            return {str(k): value(x, depth + 1) for k, x in v.items()}
        kind = type(v).__module__ + "." + type(v).__qualname__
        if depth == 0 and not isinstance(v, nn.Module) and hasattr(v, "__dict__"):
            return [kind, {k: value(x, 1) for k, x in vars(v).items()}]
        return kind

    return [[n, {k: value(v) for k, v in vars(m).items() if k not in _MODULE_STATE}]
            for n, m in model.named_modules()]


_MODULE_STATE = frozenset(vars(nn.Module()))   # nn.Module's own bookkeeping: parameters, buffers, children, hooks


def _input_key(kwargs: dict[str, Any], dynamic: bool, general: bool = False) -> list:
    from torch.utils import _pytree as pytree

    out = []
    for name, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            # dynamic: the rank and which non-batch sizes are 1 (torch.export keeps those static; ``general``: as
            # if none were, the key of a graph symbolic in them, which serves size 1 too)
            shape = [v.dim(), [d == 1 and not general for d in v.shape[1:]]] if dynamic else list(v.shape)
            out.append([name, "tensor", str(v.dtype), v.device.type, shape])
        elif type(v) in pytree.SUPPORTED_NODES and type(v) not in (list, tuple, dict):
            leaves, spec = pytree.tree_flatten(v)       # a container input (a KV cache): its structure and leaves
            out.append([name, "tree", str(spec), [[str(t.dtype), t.dim() if dynamic else list(t.shape),
                                                   [d == 1 for d in t.shape[1:]]]
                                                  for t in leaves if isinstance(t, torch.Tensor)]])
        else:
            out.append([name, "value", repr(v)])
    return out


def key_of(model: nn.Module, kwargs: dict[str, Any], dynamic: bool, general: bool = False) -> str | None:
    """The cache key for tracing ``model`` on ``kwargs``, or None when the model cannot be cached (``general``: see
    :func:`_input_key`)."""
    config = _config_key(model)
    if config is None:
        return None
    import transformers

    first: dict[int, int] = {}           # tied tensors: the index of the first name of the same tensor
    tensors = [[n, list(t.shape), str(t.dtype), str(t.device), first.setdefault(id(t), i)]
               for i, (n, t) in enumerate(list(model.named_parameters(remove_duplicate=False))
                                          + list(model.named_buffers(remove_duplicate=False)))]
    tree = [[n, type(m).__module__ + "." + type(m).__qualname__, m.training,
             bool(getattr(m, "gradient_checkpointing", False))] for n, m in model.named_modules()]
    switches = {k: v for k, v in os.environ.items() if k in _TRACE_SWITCHES}
    return json.dumps([type(model).__module__ + "." + type(model).__qualname__, config, tree, tensors,
                       model.training, _input_key(kwargs, dynamic, general), dynamic, torch.__version__,
                       transformers.__version__, switches], default=repr)


#: environment switches that choose how a model is traced (so which graph it gets)
_TRACE_SWITCHES = frozenset({"PEFTFX_TRACE_REPLICATE", "PEFTFX_SYMBOLIC_TRACE"})


def _bind(model: nn.Module, entry: _Entry) -> tuple[dict[str, torch.Tensor], fx.Graph]:
    """A copy of the cached graph and its ``get_attr`` targets bound to ``model``'s own tensors (by name)."""
    tensors = {}
    for node in entry.graph.nodes:
        if node.op == "get_attr":
            t = _lookup(model, node.target)
            tensors[node.target] = entry.constants[node.target].clone() if t is None else t
    graph = copy_graph(entry.graph)
    graph._peftfx_trace_entry = entry        # read (once) by the first plan of this graph: see analysis_slot
    return tensors, graph


def analysis_slot(graph: fx.Graph) -> dict[Any, Any] | None:
    """The analysis store of the trace-cache entry ``graph`` was copied from, once: the tag is taken off, so only the
    first plan of a graph fresh from a hit may use it (later plans see a graph that passes have changed). The
    store is keyed by a fingerprint of the graph as planned (node names in order, the count of passes that
    modified it, the role-detector pipeline; :func:`peftfx.plan.plan`), so a graph a pass changed between the
    trace and its first plan misses it."""
    entry = graph.__dict__.pop("_peftfx_trace_entry", None)
    return None if entry is None else entry.analysis


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
    if entry is None and dynamic and any(isinstance(v, torch.Tensor) and 1 in v.shape[1:] for v in kwargs.values()):
        # inputs with a size-1 sequence (traced, that size stays static): a graph symbolic in it serves them too
        general = key_of(model, kwargs, dynamic, general=True)
        if general != key and general in _CACHE:
            key, entry = general, _CACHE[general]
    if entry is not None:
        _CACHE.move_to_end(key)
        _STATS["hits"] += 1
        return _bind(model, entry)
    _STATS["misses"] += 1
    gm = export()
    graph = _copy_graph(gm.graph)
    constants = {}
    for node in list(graph.nodes):
        if droppable(node):
            graph.erase_node(node)      # torch.export's input guards and metadata asserts: what the cleanup pass
            #                             (run on every trace) drops, dropped once here so it finds nothing on a hit
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


# ------------------------------------------------------------------------------------ building a model fast
def assemble(items: list[tuple[str, Any, bool]], graph: fx.Graph, class_name: str, *,
             modes: dict | None = None) -> Any:
    """A :class:`~peftfx.model.PeftModel` on ``graph`` (code generation deferred) holding ``items`` —
    ``(path, value, persistent)`` in order: a parameter, a buffer (a tensor that is no parameter) or a module — at
    their paths, with plain ``nn.Module``s in between. What ``GraphModule(root, graph)`` builds by ``setattr`` per
    ``get_attr`` target, in the same order (so ``named_parameters`` and ``state_dict`` list the same keys in the
    same order), written into the new modules' ``_parameters``/``_buffers``/``_modules`` directly. A value None is
    a plain module at that path. ``modes`` (apply's cache): ``graph`` is a template the model copies on first use
    (:meth:`~peftfx.model.PeftModel.share_graph`)."""
    from .model import PeftModel

    pm = PeftModel({}, fx.Graph(), class_name=class_name, defer_codegen=True)
    modules: dict[str, nn.Module] = {"": pm}
    for path, value, persistent in items:
        if value is None:                     # a plain module with nothing of its own yet
            _module_at(pm, modules, path)
        else:
            _attach(pm, modules, path, value, persistent)
    if modes is not None:     # apply's cache: the template graph, copied on first use (PeftModel.share_graph)
        pm.share_graph(graph, modes)
    else:
        pm.graph = graph
    tracer = graph._tracer_cls
    pm._tracer_cls = tracer if tracer and "<locals>" not in tracer.__qualname__ else None
    pm._tracer_extras = graph._tracer_extras or {}
    return pm


def _module_at(root: nn.Module, modules: dict[str, nn.Module], path: str) -> nn.Module:
    mod = modules.get(path)
    if mod is None:
        parent_path, _, name = path.rpartition(".")
        parent = _module_at(root, modules, parent_path)
        mod = nn.Module()
        if parent is root or name in parent.__dict__ or hasattr(nn.Module, name):
            setattr(parent, name, mod)
        else:                    # a fresh plain module: what setattr would do, without its checks
            parent._modules[name] = mod
        modules[path] = mod
    return mod


def _attach(root: nn.Module, modules: dict[str, nn.Module], path: str, value: Any, persistent: bool) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _module_at(root, modules, parent_path)
    slow = parent is root or name in parent.__dict__ or hasattr(nn.Module, name)
    if isinstance(value, nn.Module):
        if slow:
            setattr(parent, name, value)
        else:
            parent._modules[name] = value
        modules[path] = value
    elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        if slow:
            parent.register_buffer(name, value, persistent=persistent)
        else:
            parent._buffers[name] = value
            if not persistent:
                parent._non_persistent_buffers_set.add(name)
    elif slow:
        setattr(parent, name, value)
    else:
        parent._parameters[name] = value


# ------------------------------------------------------------------------- apply's cache (second level)
@dataclass
class Applied:
    """What ``apply`` made of a model, minus everything that is the model's or fresh per call: the graph after the
    passes (a template: never a model's own), the module tree as ``(path, source, persistent)`` in order — source
    ``("model", name)`` a tensor of the model, ``("const", tensor)`` a graph constant (cloned per hit),
    ``("adapter", name)`` an adapter module (built anew per hit), ``("module", None)`` a plain module in between —
    the adapter builds ``(name, rule index, site, roles)`` in build order, the code generated for the graph, the
    ``peft_info`` (rules and device are the caller's) and the modes."""

    graph: fx.Graph
    layout: list[tuple[str, tuple[str, Any], bool]]
    builds: list[tuple[str, int, Any, set[str]]]
    code: dict[str, Any]
    info: Any
    graph_mode: bool | None
    training: bool
    class_name: str
    meta: dict[str, Any]
    #: train/eval mode → (graph, code) with dropout set for it; filled when a model built from here switches mode
    modes: dict[bool, tuple[fx.Graph, dict[str, Any]]] = field(default_factory=dict)


_APPLIED: OrderedDict[str, Applied] = OrderedDict()


def _apply_enabled() -> bool:
    return _enabled() and os.environ.get("PEFTFX_APPLY_CACHE", "1") not in ("0", "false", "off", "")


def rules_key(rules: list[Any]) -> Any:
    """Every rule's class and every field (hyperparameters, selector, init options), or None when a rule has a
    field whose text names an object by address (a function, an object without a value ``repr``)."""
    text = json.dumps([[type(r).__module__ + "." + type(r).__qualname__, r.to_dict(), repr(r)] for r in rules],
                      sort_keys=True, default=repr)
    return None if " at 0x" in text else text


def applied_key(model: nn.Module, kwargs: dict[str, Any], dynamic: bool, training: bool,
                rules: list[Any]) -> str | None:
    """The key of ``apply``'s cache: the trace key (:func:`key_of`, on the model as it is, modes included), the mode
    it is traced in, and the rules (:func:`rules_key`); None when either cannot be keyed."""
    if not _apply_enabled():
        return None
    trace_key = key_of(model, kwargs, dynamic)
    rkey = rules_key(rules) if trace_key is not None else None
    if rkey is None:
        return None
    return json.dumps([trace_key, training, rkey])


def lookup_applied(key: str | None) -> Applied | None:
    entry = _APPLIED.get(key) if key is not None else None
    if entry is not None:
        _APPLIED.move_to_end(key)
        _STATS["applied_hits"] += 1
    return entry


def store_applied(key: str, entry: Applied) -> None:
    _APPLIED[key] = entry
    _STATS["applied_entries_made"] += 1
    while len(_APPLIED) > MAX_ENTRIES:
        _APPLIED.popitem(last=False)


#: every hook dict of an ``nn.Module`` but the forward pre-hooks (``hooked`` counts those); the ``*_with_kwargs``
#: and ``*_always_called`` ones only mark hooks these hold
_MODULE_HOOKS = ("_forward_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
                 "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def hooked(mod: nn.Module, pre_hooks: int = 0) -> bool:
    """Whether ``mod`` has a hook apply's cache would not rebuild: any module hook, or other than ``pre_hooks``
    forward pre-hooks (a PeftModel's own: its input constants)."""
    return len(mod._forward_pre_hooks) != pre_hooks or any(getattr(mod, h) for h in _MODULE_HOOKS)


def layout_of(pm: nn.Module, model: nn.Module, adapters: set[str]) -> list | None:
    """``pm``'s module tree as :class:`Applied` keeps it (see there), or None when it holds anything else: a
    module in between that is not a plain ``nn.Module`` or has hooks, a parameter that is neither the model's nor
    an adapter's."""
    names: dict[int, str] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), n)
    out: list = []

    def walk(mod: nn.Module, prefix: str) -> bool:
        if mod is not pm and (type(mod) is not nn.Module or hooked(mod)):
            return False
        for name, p in mod._parameters.items():
            if p is None or id(p) not in names:
                return False
            out.append((prefix + name, ("model", names[id(p)]), True))
        for name, b in mod._buffers.items():
            if b is None:
                return False
            src = ("model", names[id(b)]) if id(b) in names else ("const", b.detach().clone())
            out.append((prefix + name, src, name not in mod._non_persistent_buffers_set))
        for name, child in mod._modules.items():
            path = prefix + name
            if path in adapters:
                out.append((path, ("adapter", path), True))
            elif child is None:
                return False
            else:
                out.append((path, ("module", None), True))
                if not walk(child, path + "."):
                    return False
        return True

    return out if walk(pm, "") else None
