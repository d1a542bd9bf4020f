"""The module peftfx returns: an ``fx.GraphModule`` that behaves like the model it came from.

``PeftModel`` is an ordinary ``nn.Module``: ``train()``/``eval()`` switch dropout (the graph's dropout and
attention-dropout arguments are rewritten by :func:`~peftfx.passes.dropout.dropout_mode_pass` when the mode
changes), ``.to()`` moves parameters and rewrites device constants frozen into the graph at trace time
(:func:`~peftfx.passes.device.device_pass`), ``state_dict()`` has the
original model's keys plus the adapters', and DDP wraps it like any module.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ._errors import PeftfxError
from ._util import find_submodule, is_tensor_attr
from ._graphcopy import copy_graph

__all__ = ["PeftModel", "call_key", "register_service", "PeftInfo", "AdapterRecord", "require_peft", "adapter_name", "adapter_of", "adapter_nodes", "output_chain",
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
    """A traced model with adapters. Build it with :func:`peftfx.apply` or :func:`peftfx.trace`.

    A model returned by :func:`peftfx.apply` keeps one graph per call signature and mode (see
    :mod:`peftfx.variants`): its own graph (``.graph``, ``.code``; the one passes act on) is the one traced at
    ``apply`` time, in train mode, with the example inputs' signature; a call in another mode or with other
    inputs runs a graph of its own, traced on first use from the original module and sharing every tensor and
    adapter module with this one. Any pass that changes this graph makes the others stale; they are rebuilt on
    their next use. ``peftfx.trace`` returns a single-graph model (no original module kept for re-tracing)."""

    #: passes (:mod:`peftfx.passes.base`) call :meth:`recompile` on a PeftModel even while code generation is
    #: deferred: it records the change and generates code once, in :meth:`generate_code`
    _peftfx_defers = True

    def __init__(self, root: nn.Module | dict, graph: fx.Graph, class_name: str = "PeftModel", *,
                 defer_codegen: bool = False):
        self.__dict__["_peftfx_version"] = 0
        self.__dict__["_peftfx_quiet"] = False
        if defer_codegen:       # no code until generate_code() (trace → passes → apply generate it once)
            self.__dict__["_peftfx_defer_recompile"] = True
        super().__init__(root, graph, class_name)
        self.peft_info = PeftInfo()
        self._graph_mode: bool | None = None
        self.register_forward_pre_hook(_fill_constants, with_kwargs=True)

    # ------------------------------------------------------------------------------ graph, dispatch
    def recompile(self):
        """Regenerate the code of this graph. Unless the change only switched dropout (a mode change), the graphs
        of other signatures/modes become stale (they are rebuilt on next use). ``forward`` dispatches by call
        signature and mode when the model keeps several graphs; ``_graph_forward`` runs this graph.

        While code generation is deferred (a :class:`~peftfx.passes.base.PassManager` run, or ``defer_codegen``
        until :meth:`generate_code`) the change is recorded (other graphs go stale now) and no code is generated."""
        if not self.__dict__.get("_peftfx_quiet", False):
            self.__dict__["_peftfx_version"] = self.__dict__.get("_peftfx_version", 0) + 1
        if self.__dict__.get("_peftfx_defer_recompile"):
            self.__dict__["_peftfx_dirty"] = True
            return None
        out = super().recompile()
        self._install_forward(type(self).forward)
        return out

    def _install_forward(self, graph_forward: Any) -> None:
        """``forward`` (dispatch by signature and mode) and ``_graph_forward`` around this graph's generated code."""
        cls = type(self)
        cls._peftfx_graph_code = graph_forward        # the generated function itself (trace_cache reuses it)
        cls._graph_forward = _graph_runner(graph_forward)

        def forward(self, *args, **kwargs):
            return _dispatch_forward(self, *args, **kwargs)

        # torch.export, Trainer (which columns to keep) and pipelines read forward's signature: the graph's own,
        # or, for a model keeping several graphs, the original module's (set by peftfx.variants)
        forward.__signature__ = self.__dict__.get("_peftfx_signature") or inspect.signature(graph_forward)
        cls.forward = forward

    def adopt_code(self, code: dict[str, Any]) -> None:
        """Take generated code made for an identical graph (:mod:`peftfx.trace_cache`: a hit on ``apply``'s cache)
        instead of generating it: what ``GraphModule.recompile`` sets, with the same function object (it reads
        everything through ``self``)."""
        from torch.fx.graph_module import _WrappedCall

        d = self.__dict__
        d.pop("_peftfx_defer_recompile", None)
        d.pop("_peftfx_dirty", None)
        for k in ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec"):
            if k in code:
                d[k] = code[k]
        cls = type(self)
        cls.forward = code["fn"]
        cls_call = cls.__call__ if "__call__" in vars(cls) else None
        if "_wrapped_call" not in vars(cls):
            cls._wrapped_call = _WrappedCall(cls, cls_call)

        def call_wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._wrapped_call(self, *args, **kwargs)

        cls.__call__ = call_wrapped
        self._install_forward(code["fn"])

    def code_record(self) -> dict[str, Any] | None:
        """What :meth:`adopt_code` takes, for this model's current code (None while code generation is deferred)."""
        d = self.__dict__
        fn = vars(type(self)).get("_peftfx_graph_code")
        if fn is None or d.get("_peftfx_defer_recompile") or "_code" not in d:
            return None
        return {"fn": fn} | {k: d[k] for k in ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")
                             if k in d}

    # ------------------------------------------------------------------- a graph shared until first use
    @property
    def graph(self) -> fx.Graph:
        """The graph (``GraphModule.graph``). A model built on a hit of ``apply``'s cache starts on the cache's
        graph, read-only, and takes its own copy here, on first use (running the model needs no graph)."""
        if "_peftfx_shared_graph" in self.__dict__:
            self._own_graph()
        return self.__dict__["_graph"]

    @graph.setter
    def graph(self, g: fx.Graph) -> None:
        self.__dict__.pop("_peftfx_shared_graph", None)
        fx.GraphModule.graph.fset(self, g)

    def share_graph(self, template: fx.Graph, modes: dict[bool, tuple[fx.Graph, dict]]) -> None:
        """Run on ``template``'s code without a graph of its own until one is needed: then ``copy_graph(template)``
        becomes this model's graph (``template`` itself is never handed out, nor changed). ``modes``: train/eval
        mode → (template, code record) of the same graph with dropout set for that mode, shared with the cache:
        :meth:`train` switches to one without a pass or code generation, and records it after switching."""
        self.__dict__.pop("_graph", None)
        self.__dict__["_peftfx_shared_graph"] = (template, modes)

    def __reduce__(self):
        if "_peftfx_shared_graph" in self.__dict__:     # fx pickles ``__dict__`` less its graph: take one first
            self._own_graph()
        return super().__reduce__()

    def __reduce_package__(self, exporter: Any):
        if "_peftfx_shared_graph" in self.__dict__:
            self._own_graph()
        return super().__reduce_package__(exporter)

    def _own_graph(self) -> None:
        template, _ = self.__dict__.pop("_peftfx_shared_graph")
        graph = copy_graph(template)
        self.__dict__["_graph"] = graph
        graph.owning_module = self

    def generate_code(self) -> None:
        """End a deferral begun with ``defer_codegen=True``: generate this graph's code now, once, if the graph
        changed since (the staleness of other graphs was recorded when it changed)."""
        d = self.__dict__
        d.pop("_peftfx_defer_recompile", None)
        if d.pop("_peftfx_dirty", False):
            quiet, d["_peftfx_quiet"] = d["_peftfx_quiet"], True
            try:
                self.recompile()
            finally:
                d["_peftfx_quiet"] = quiet

    # ------------------------------------------------------------------------ the original module's face
    def __getattr__(self, name: str) -> Any:
        if name == "_graph" and "_peftfx_shared_graph" in self.__dict__:   # fx's own code reads ``_graph``
            self._own_graph()
            return self.__dict__["_graph"]
        try:
            return super().__getattr__(name)
        except AttributeError:
            origin = self.__dict__.get("_peftfx_origin")
            if origin is not None and name in _FROM_SOURCE and hasattr(origin[0], name):
                return getattr(origin[0], name)
            raise

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (buffer), as ``PreTrainedModel.device``."""
        return next(iter(self.parameters()), next(iter(self.buffers()), torch.empty(0))).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter, as ``PreTrainedModel.dtype``."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.get_default_dtype())

    def disable_adapter(self):
        """A context manager: calls inside run the base model (every method's adapters off, train and eval); on
        exit the adapters are back. Needs a model from :func:`peftfx.apply` (one that keeps the original)."""
        variants = self.peft_variants
        if variants is None:
            raise PeftfxError("disable_adapter() needs a model returned by peftfx.apply() or load_adapter(): it "
                              "runs the original module's graph without adapters.")
        return variants.disable(self)

    @property
    def base_model(self) -> Any:
        """The backbone (hidden states before the output head) run by the adapted graphs, as Hugging Face's
        ``base_model``: :class:`peftfx.integrations.backbone.Backbone` (TRL's fused LM head calls it)."""
        return _service("base_model")(self)

    def save_pretrained(self, save_directory, **kwargs: Any) -> str:
        """Write the adapter into ``save_directory`` as Hugging Face's ``save_pretrained`` does (a Hugging Face PEFT
        folder by default; other files there are kept; ``is_main_process``, ``state_dict``, ``format="peftfx"``):
        :func:`peftfx.io.pretrained.save_pretrained`."""
        return _service("save_pretrained")(self, save_directory, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Hugging Face ``generate`` on the adapted graphs: :func:`peftfx.dropin.generate`."""
        return _service("generate")(self, *args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1,
                                      offload: bool = False) -> None:
        """Activation checkpointing per repeated block, as Hugging Face's method of this name (and
        ``activation_checkpointing_enable``, which the Trainer calls): :func:`peftfx.layers.gradient_checkpointing`.
        Every block is checkpointed, non-reentrant (``use_reentrant=False``, RNG state preserved); other
        ``gradient_checkpointing_kwargs``, ``every_n_layers`` ≠ 1 and ``offload`` are an error."""
        extra = {k: v for k, v in (gradient_checkpointing_kwargs or {}).items()
                 if not (k == "use_reentrant" and v is False) and not (k == "preserve_rng_state" and v is True)}
        if every_n_layers != 1:
            extra["every_n_layers"] = every_n_layers
        if offload:
            extra["offload"] = offload
        if extra:
            raise PeftfxError(f"activation checkpointing options {extra} are not supported: peftfx checkpoints every "
                              "block with use_reentrant=False and preserve_rng_state=True (exact gradients).")
        _service("gradient_checkpointing")(self, True)

    def gradient_checkpointing_disable(self) -> None:
        """Activation checkpointing off (:func:`peftfx.layers.gradient_checkpointing` with ``enable=False``)."""
        _service("gradient_checkpointing")(self, False)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers ≥ 5.25's name for :meth:`gradient_checkpointing_enable`."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        """transformers ≥ 5.25's name for :meth:`gradient_checkpointing_disable`."""
        self.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether blocks are checkpointed in train mode (Hugging Face's attribute of this name)."""
        return bool(_service("gradient_checkpointing_on")(self))

    @property
    def is_activation_checkpointing(self) -> bool:
        """transformers ≥ 5.25's name for :attr:`is_gradient_checkpointing`."""
        return self.is_gradient_checkpointing

    def mark_stale(self) -> None:
        """The graphs of other modes/signatures are rebuilt on their next use. Passes do this by changing the
        graph; call it after replacing a module the graph calls without a graph change."""
        self.__dict__["_peftfx_version"] = self.__dict__.get("_peftfx_version", 0) + 1

    @property
    def peft_variants(self):
        """The registry of graphs per (mode, call signature) (:class:`peftfx.variants.Variants`), or None for a
        single-graph model."""
        return self.__dict__.get("_peftfx_variants")

    # ----------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "PeftModel":
        super().train(mode)
        if self._graph_mode is not mode:
            from .passes.dropout import dropout_mode_pass

            # a graph still shared with apply's cache: its version for this mode, when a model switched before
            shared = self.__dict__.get("_peftfx_shared_graph")
            if shared is not None and mode in shared[1]:
                template, code = shared[1][mode]
                self.__dict__["_peftfx_shared_graph"] = (template, shared[1])
                self.adopt_code(code)
                self._graph_mode = mode
                return self
            self.__dict__["_peftfx_quiet"] = True      # a dropout switch leaves the other graphs valid
            try:
                dropout_mode_pass(self, mode)
            finally:
                self.__dict__["_peftfx_quiet"] = False
            self._graph_mode = mode
            code = self.code_record() if shared is not None else None
            if code is not None:     # the next model of that cache entry switches without a pass or codegen
                shared[1][mode] = (copy_graph(self.graph), code)
        return self

    # ---------------------------------------------------------------------------------------- device
    def _apply(self, fn, recurse: bool = True):  # called by .to(), .cuda(), .half(), to_empty() …
        out = super()._apply(fn, recurse)
        device = next((p.device for p in self.parameters()), None)
        if device is not None and device != self.peft_info.device:
            self._rewrite_devices(device)
        variants = self.peft_variants
        if variants is not None:   # buffers are new tensors now: re-point the original module, rebuild the others
            variants.follow(self)
        return out

    def _rewrite_devices(self, device: torch.device) -> None:
        """Device constants frozen at trace time (``arange(device=cpu)``, ``.to(cpu)``) follow the weights."""
        from .passes.device import device_pass

        device_pass(self, self.peft_info.device, device)
        self.peft_info.device = device

    # ------------------------------------------------------------------------------------------ copy
    def fork(self, graph: fx.Graph | None = None) -> "PeftModel":
        """A new PeftModel over a copy of this graph, sharing every parameter and adapter module.

        Passes that must not touch the caller's model (merge, unmerge) work on a fork. It keeps activation
        checkpointing when this model has it on (:func:`peftfx.gradient_checkpointing`)."""
        if graph is None:
            graph = copy_graph(self.graph)
        twin = PeftModel(self, graph, class_name=type(self).__name__.replace("GraphModuleImpl", "PeftModel"))
        for name in self.peft_info.adapters:
            if find_submodule(twin, name) is None:
                twin.add_submodule(name, self.get_submodule(name))
        twin.peft_info = copy.deepcopy(self.peft_info)
        if "_peftfx_origin" in self.__dict__:
            twin.__dict__["_peftfx_origin"] = self.__dict__["_peftfx_origin"]
        if self.peft_variants is not None:
            twin.__dict__["_peftfx_variants"] = self.peft_variants.fresh()
            twin.__dict__["_peftfx_signature"] = self.__dict__.get("_peftfx_signature")
            type(twin).forward.__signature__ = twin.__dict__["_peftfx_signature"]
        _carry_checkpointing(self, twin)
        twin.train(self.training)
        return twin

    def __deepcopy__(self, memo: dict) -> "PeftModel":
        """``copy.deepcopy`` keeps what ``GraphModule.__deepcopy__`` drops: ``peft_info``, the forward hooks
        (input constants, QLoRA recompute), the train/eval state of the graph and activation checkpointing."""
        if "_peftfx_shared_graph" in self.__dict__:     # fx copies ``__dict__``: its own graph first
            self._own_graph()
        res = super().__deepcopy__(memo)
        res.peft_info = copy.deepcopy(self.peft_info, memo)
        res._graph_mode = self._graph_mode
        origin = self.__dict__.get("_peftfx_origin")
        if origin is not None:
            res.__dict__["_peftfx_origin"] = (copy.deepcopy(origin[0], memo),) + tuple(origin[1:])
        if self.peft_variants is not None:
            res.__dict__["_peftfx_variants"] = self.peft_variants.fresh(copy.deepcopy(self.peft_variants.source, memo))
            res.__dict__["_peftfx_signature"] = self.__dict__.get("_peftfx_signature")
            type(res).forward.__signature__ = res.__dict__["_peftfx_signature"]
        for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(self, attr):
                setattr(res, attr, type(getattr(self, attr))(getattr(self, attr)))
        if getattr(self, "_peftfx_recompute", None) is not None:
            res._peftfx_recompute = []
        res.training = self.training
        _carry_checkpointing(self, res)
        return res

    def adapter_modules(self) -> dict[str, nn.Module]:
        return {name: self.get_submodule(name) for name in self.peft_info.adapters}


_SERVICES: dict[str, Any] = {}


def register_service(name: str, fn: Any) -> None:
    """Rooms that build on this one (io, dropin) provide PeftModel's methods that need them (no import circle)."""
    _SERVICES[name] = fn


def _service(name: str) -> Any:
    if name not in _SERVICES:
        raise PeftfxError(f"{name}() needs peftfx.dropin; import peftfx.")
    return _SERVICES[name]


#: Attributes a PeftModel answers from the module it was traced from (a Hugging Face model's face).
_FROM_SOURCE = frozenset({"config", "generation_config", "name_or_path", "main_input_name", "can_generate",
                          "base_model_prefix", "_no_split_modules", "warnings_issued", "model_tags",
                          "_supports_cache_class", "_is_stateful", "hf_device_map", "is_parallelizable",
                          "model_parallel", "supports_gradient_checkpointing", "is_gradient_checkpointing",
                          "add_model_tags", "get_input_embeddings", "get_output_embeddings"})


def _carry_checkpointing(src: PeftModel, dst: PeftModel) -> None:
    """A copy (fork, deepcopy) keeps ``src``'s activation checkpointing (:mod:`peftfx.layers`, when loaded)."""
    carry = _SERVICES.get("carry_checkpointing")
    if carry is not None:
        carry(src, dst)


def _graph_runner(flat: Any) -> Any:
    """``_graph_forward``: this graph's code, or its layered view (one call per repeated block, for activation
    checkpointing and FSDP2 per block) when one is on (:mod:`peftfx.layers`)."""
    def run(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
        layered = _SERVICES.get("layered_forward")
        fn = layered(self) if layered is not None else None
        return (fn or flat)(self, *args, **kwargs)
    return run


def _dispatch_forward(self: "PeftModel", *args: Any, **kwargs: Any) -> Any:
    """``forward`` of every PeftModel: this graph's code, or (a model keeping several graphs) the graph for the
    call's mode and signature (:meth:`peftfx.variants.Variants.call`)."""
    variants = self.__dict__.get("_peftfx_variants")
    if variants is None:
        return self._graph_forward(*args, **kwargs)
    return variants.call(self, args, kwargs)


def _fill_constants(module: "PeftModel", args: tuple, kwargs: dict):
    """Non-tensor inputs fixed at trace time (``use_cache=False``) may be omitted; a different value is an
    error because the graph cannot honour it. (A model keeping several graphs binds its inputs itself.)"""
    if module.__dict__.get("_peftfx_variants") is not None:
        return None
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


def call_key(kwargs: dict[str, Any], training: bool, dynamic: bool = True) -> tuple:
    """What selects a graph for a call: the mode, and per bound input (in signature order, ``None`` left out) its
    kind — for a tensor its rank, dtype and which non-batch dimensions are 1 (``torch.export`` specialises size-1
    dimensions; with ``dynamic=False`` the whole shape), for a constant its value."""
    parts = []
    for name, v in kwargs.items():
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            shape = tuple(v.shape) if not dynamic else tuple(isinstance(d, int) and d == 1 for d in v.shape[1:])
            parts.append((name, "tensor", v.dim(), v.dtype, shape))
        elif isinstance(v, (bool, int, float, str)):
            parts.append((name, "value", v))
        else:
            parts.append((name, "object", type(v).__qualname__, _structure(v)))
    return (bool(training), tuple(parts))


def _structure(v: Any) -> Any:
    """A hashable summary of a non-tensor input: its pytree structure where torch knows one (a cache object),
    with each tensor leaf's rank, dtype and size-1 non-batch dimensions (as for a tensor input: an empty cache, a
    filled one and one holding a single position are three graphs)."""
    from torch.utils import _pytree as pytree

    try:
        leaves, spec = pytree.tree_flatten(v)
    except Exception:  # not a pytree: one graph per type
        return None
    return (str(spec), tuple((t.dim(), t.dtype, tuple(d == 1 for d in t.shape[1:]))
                             for t in leaves if isinstance(t, torch.Tensor)))
