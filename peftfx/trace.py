"""Model → graph: ``torch.export`` (non-strict) as the front end, a plain trainable GraphModule as the result.

The traced module keeps the original calling convention (same keyword names, positional order of the
original ``forward``) and output structure (``ModelOutput``, tuple, tensor), and every node carries
``node.meta["peftfx"] = {"path", "layer", "module_type"}``.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import re
import time
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from ._errors import TraceError
from .model import PeftModel, call_key
from .passes.base import PassManager
from .passes.cleanup import cleanup_pass
from .passes.dropout import mode_dropout_pass
from .trace_cache import assemble, cached_export
from .trace_patches import traceable_experts
from .trace_replicate import clean_path as _clean_path
from .trace_replicate import export_replicated
from .trace_symbolic import symbolic_export

__all__ = ["trace", "trace_deferred", "trace_inputs", "normalize_inputs", "hf_extra_inputs", "widen_unit_sequence"]

log = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
#: config fields (and module attributes copied from them) that switch on training-time randomness decided on the host:
#: LayerDrop (``layerdrop``, ``encoder_layerdrop``, …) branches in Python on ``torch.rand([]) < p``, SpecAugment
#: (``mask_time_prob``, ``mask_feature_prob``) draws its masks with numpy. No graph can hold either.
_HOST_RANDOM = re.compile(r"(?:\w+_)?layerdrop|mask_time_prob|mask_feature_prob")


def normalize_inputs(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Bind ``example_inputs`` (a dict, a tuple of positionals, or one tensor) to ``model.forward``'s
    parameter names, in the order of its signature. Hugging Face models that take ``use_cache`` get
    ``use_cache=False`` unless the caller set it: a KV cache object cannot be traced and a user who
    passes only ``input_ids`` must not need to know that."""
    if example_inputs is None:
        raise TraceError(
            "apply()/trace() needs example inputs to trace the model: pass example_inputs={'input_ids': ids} "
            "(a dict of keyword inputs), a tuple of positional inputs, or a single tensor."
        )
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TraceError(
            f"example_inputs must be a dict, a tuple or a tensor, got {type(example_inputs).__name__}."
        )
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise TraceError(f"example_inputs do not fit {type(model).__name__}.forward: {e}") from None
    params = sig.parameters
    if any(p.kind == p.VAR_POSITIONAL for name, p in params.items() if name in bound.arguments):
        raise TraceError("peftfx cannot trace a forward(*args) call; pass inputs by keyword instead.")
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if params[name].kind == inspect.Parameter.VAR_KEYWORD:
            if hasattr(model, "config") and set(value) - hf_extra_inputs():   # HF forwards swallow typos
                named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
                raise TraceError(f"example_inputs do not fit {type(model).__name__}.forward: "
                                 f"{sorted(set(value) - hf_extra_inputs())} is not one of its inputs {named}.")
            out.update(value)
        else:
            out[name] = value
    if "use_cache" in params and "use_cache" not in out and hasattr(model, "config"):
        out["use_cache"] = False
    return out


def hf_extra_inputs() -> set[str]:
    """Keyword inputs a Hugging Face ``forward(**kwargs)`` accepts beyond its named parameters (``return_dict``,
    ``output_hidden_states`` and the rest of transformers' ``TransformersKwargs``)."""
    try:
        from transformers.utils.generic import TransformersKwargs
        names = set(TransformersKwargs.__annotations__)
    except ImportError:  # an older transformers: the common ones
        names = {"output_hidden_states", "output_attentions"}
    return names | {"return_dict"}


def _dynamic_shapes(kwargs: dict[str, Any], dynamic: bool, model: nn.Module | None = None) -> dict[str, Any] | None:
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO
    spec: dict[str, Any] = {}
    for name, v in kwargs.items():
        if not isinstance(v, torch.Tensor) and _tree_node(v):
            spec[name] = _tree_shapes(v)      # a registered container (a KV cache): every leaf dim AUTO
        elif not isinstance(v, torch.Tensor) or v.dim() == 0:
            spec[name] = None
        elif _has_sequence(v):
            # (batch, sequence[, hidden]); a sequence of 1 (a decode step) stays static, as torch.export would
            spec[name] = {0: auto, 1: auto} if v.shape[1] != 1 else {0: auto}
        else:
            spec[name] = {0: auto}            # (batch, …) e.g. pixel values
    if model is not None:                     # inputs that go to forward(**kwargs) nest under that name
        params = inspect.signature(model.forward).parameters
        var_kw = next((n for n, p in params.items() if p.kind == p.VAR_KEYWORD), None)
        extra = [n for n in spec if n not in params]
        if var_kw and extra:
            spec[var_kw] = {n: spec.pop(n) for n in extra}
    return spec


def _has_sequence(v: torch.Tensor) -> bool:
    """Whether dim 1 of an input is its sequence: token-shaped (batch, sequence) or embeddings (batch, sequence,
    hidden)."""
    return v.dim() == 2 or (v.dim() == 3 and v.is_floating_point())


def _tree_node(v: Any) -> bool:
    """Whether ``v`` is a container torch's pytree registry knows (a Hugging Face cache once registered)."""
    from torch.utils import _pytree as pytree

    return type(v) not in (list, tuple, dict) and type(v) in pytree.SUPPORTED_NODES


def _tree_shapes(v: Any) -> Any:
    """``dynamic_shapes`` for a registered container: one entry per child of its flatten, recursed; every
    dimension of a tensor leaf ``Dim.AUTO`` (torch.export keeps static what the model fixes, e.g. heads)."""
    from torch.utils import _pytree as pytree

    if isinstance(v, torch.Tensor):      # size-1 dims stay static (the call key tells such inputs apart)
        return {i: torch.export.Dim.AUTO for i in range(v.dim()) if i == 0 or v.shape[i] != 1} or None
    if type(v) in (list, tuple) or (isinstance(v, (list, tuple)) and type(v) not in pytree.SUPPORTED_NODES):
        return type(v)(_tree_shapes(x) for x in v)
    if type(v) is dict or (isinstance(v, dict) and type(v) not in pytree.SUPPORTED_NODES):
        return {k: _tree_shapes(x) for k, x in v.items()}
    node = pytree.SUPPORTED_NODES.get(type(v))      # e.g. a ModelOutput (a dict registered as its own node)
    if node is None:
        return None
    return [_tree_shapes(c) for c in node.flatten_fn(v)[0]]


def _widen_batch(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A batch-1 example makes torch.export specialise the batch dimension to 1; trace with 2 rows (tensors
    inside a registered container, such as a KV cache, too)."""
    from torch.utils import _pytree as pytree

    def leaves(v):
        return pytree.tree_leaves(v) if _tree_node(v) else [v]

    tensors = [t for v in kwargs.values() for t in leaves(v) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if tensors and all(t.shape[0] == 1 for t in tensors):
        log.info("example inputs have batch 1; tracing with the row repeated so the batch stays dynamic")

        def rep(v):
            return v.repeat(2, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() > 0 else v

        return {k: (pytree.tree_map(rep, v) if _tree_node(v) else rep(v)) for k, v in kwargs.items()}
    return kwargs


def _unalias(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``labels=ids, input_ids=ids`` (one tensor under two names) would become a single graph input in
    torch.export; give each name its own tensor so the graph keeps one input per name."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            key = (v.untyped_storage().data_ptr(), v.storage_offset())
            if key in seen and v.numel() > 0:
                v = v.clone()
            seen.add(key)
        elif isinstance(v, torch.Tensor):
            key = (id(v), 0)
            if key in seen:
                v = v.clone()
            seen.add(key)
        out[k] = v
    return out


def layer_index(path: str) -> int | None:
    """The first integer component of a module path (``model.layers.3.self_attn`` → 3)."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def _annotate(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path, mtype = "", ""
        if stack:
            path, cls = list(stack.values())[-1]
            mtype = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
            path = _clean_path(path)
        if node.op == "get_attr":
            path = node.target.rsplit(".", 1)[0] if "." in node.target else ""
        node.meta["peftfx"] = {"path": path, "layer": layer_index(path), "module_type": mtype.rsplit(".", 1)[-1]}


def widen_unit_sequence(example: dict[str, Any]) -> dict[str, Any]:
    """A call with a 1-token sequence and no KV cache (not a generation step) is traced with the sequence repeated to
    2, so its graph stays dynamic in the sequence, as the graph a trace-cache hit serves for it is (a graph traced at
    1 pins the length, and prompt tuning or p-tuning cannot widen it with their virtual tokens). Every input with a
    sequence axis (:func:`_has_sequence`) of 1 is repeated along it; the graph's outputs at length 1 are those of the
    model (checked by the symbolic trace at another length, and by the callers' tests)."""
    if any(_tree_node(v) for v in example.values()):
        return example                 # a cache object: a decode step, traced as it is called
    ids = example.get("input_ids", example.get("inputs_embeds"))
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2 or ids.shape[1] != 1:
        return example

    def unit(v):
        return isinstance(v, torch.Tensor) and _has_sequence(v) and v.shape[1] == 1

    return {k: v.repeat(1, 2, *([1] * (v.dim() - 2))) if unit(v) else v for k, v in example.items()}


def trace(model: nn.Module, example_inputs: Any = None, *, dynamic: bool = True,
          training: bool = True) -> PeftModel:
    """Trace ``model`` with ``example_inputs`` into a :class:`PeftModel` (an ``fx.GraphModule``).

    Guarantees: batch and sequence dimensions are dynamic (``dynamic=True``: a static export made symbolic and checked
    at a second shape, :mod:`peftfx.trace_symbolic`, else the dynamic ``torch.export``); the parameters are the
    model's own tensors (nothing is copied); a model of an architecture already traced in this process (same
    class, config and input spec) reuses that graph (:mod:`peftfx.trace_cache`); dropout follows
    ``train()``/``eval()``; the model's train/eval mode is unchanged afterwards and the result starts in the same
    mode. The model runs in train mode while traced (``training=False``: eval mode, so BatchNorm, stochastic depth
    and every ``if self.training:`` branch take their eval side); in train mode LayerDrop and SpecAugment, whose
    decisions are drawn on the host, are off while tracing (:func:`_host_randomness_off`, warned). The result
    remembers ``model`` and the inputs' :func:`~peftfx.model.call_key`, so :func:`peftfx.apply` can trace other
    modes and signatures (:mod:`peftfx.variants`).
    """
    pm = trace_deferred(model, example_inputs, dynamic=dynamic, training=training)
    pm.generate_code()
    return pm


def trace_inputs(model: nn.Module, example_inputs: Any, dynamic: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(inputs by name, the inputs traced with)``: :func:`normalize_inputs`, then a batch of 1 widened to 2 (dynamic)
    and one tensor per name. Raises :class:`TraceError` for a PeftModel or inputs that do not fit."""
    if isinstance(model, PeftModel):
        raise TraceError("this model is already a peftfx model; apply rules to the original nn.Module.")
    kwargs = normalize_inputs(model, example_inputs)
    return kwargs, _unalias(_widen_batch(kwargs) if dynamic else kwargs)


def trace_deferred(model: nn.Module, example_inputs: Any = None, *, dynamic: bool = True,
                   training: bool = True) -> PeftModel:
    """:func:`trace` without generating the graph's code: the caller runs its passes and then
    ``pm.generate_code()`` once (``apply`` does: code generation is most of an apply on a cache hit)."""
    kwargs, trace_kwargs = trace_inputs(model, example_inputs, dynamic)
    was_training = model.training
    t0 = time.perf_counter()
    model.train(training)  # train: dropout is recorded in the graph; the dropout pass makes it follow the mode
    try:
        # MoE experts set to "eager" cannot be traced: batched_mm for the trace; layerdrop/SpecAugment off
        with traceable_experts(model), _host_randomness_off(model, training), _no_cache_config(model, trace_kwargs):
            def export() -> torch.fx.GraphModule:
                return torch.export.export(model, (), kwargs=trace_kwargs, strict=False,
                                           dynamic_shapes=_dynamic_shapes(trace_kwargs, dynamic, model)).module()
            # sizes traced static and re-marked symbolic (peftfx.trace_symbolic), each distinct repeated block
            # traced once and then replicated (peftfx.trace_replicate)
            def one_pass() -> torch.fx.GraphModule:
                if not dynamic:
                    return export()
                return symbolic_export(model, trace_kwargs, _dynamic_shapes(trace_kwargs, True), export)

            root, graph = cached_export(model, trace_kwargs, dynamic,
                                        lambda: export_replicated(model, trace_kwargs, one_pass))
    except Exception as e:  # torch.export raises many types; say which model failed and how to proceed
        msg = str(e).strip().splitlines()
        raise TraceError(
            f"torch.export could not trace {type(model).__name__} with inputs "
            f"{ {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()} }: "
            f"{type(e).__name__}: {msg[0] if msg else ''}\n"
            "Try: pass every input the model needs as a keyword in example_inputs, use a batch of at least 2, "
            "or set dynamic=False if a dimension cannot be dynamic."
        ) from e
    finally:
        model.train(was_training)
    if isinstance(root, dict):        # a trace-cache hit: the graph's tensors by name, in graph order
        pm = assemble([(k, v, True) for k, v in root.items()], graph, type(model).__name__)
    else:
        pm = PeftModel(root, graph, class_name=type(model).__name__, defer_codegen=True)
    pm.peft_info.input_names = list(kwargs)
    pm.peft_info.constants = {k: v for k, v in kwargs.items()
                              if not isinstance(v, torch.Tensor) and not _tree_node(v)}
    pm.peft_info.device = first_device(model)
    pm.__dict__["_peftfx_origin"] = (model, call_key(kwargs, training, dynamic), dynamic)
    _annotate(pm)
    PassManager([cleanup_pass.bind(), mode_dropout_pass.bind()])(pm)       # one recompile for both
    pm.train(was_training)
    log.debug("traced %s in %.2fs (%d nodes)", type(model).__name__, time.perf_counter() - t0,
              len(pm.graph.nodes))
    return pm


@contextlib.contextmanager
def _no_cache_config(model: nn.Module, kwargs: dict[str, Any]):
    """A Hugging Face model whose forward takes ``use_cache`` only through ``**kwargs`` (GraniteMoe) reads it from
    its config: while it is traced without a cache input, ``config.use_cache`` is False (restored after), so the
    graph returns no cache object (torch.export cannot return one)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "use_cache", None) is not True or "use_cache" in kwargs \
            or "past_key_values" in kwargs:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


@contextlib.contextmanager
def _host_randomness_off(model: nn.Module, training: bool):
    """While a model is traced in train mode, turn off LayerDrop and SpecAugment (``_HOST_RANDOM``: set to 0 on the
    configs and modules holding them, restored after), with a warning that the training graph runs without them.
    Their decisions are drawn on the host (a Python ``if`` on ``torch.rand``, numpy masks), so torch.export either
    fails on a data-dependent guard (Wav2Vec2's LayerDrop) or would freeze one draw into every step. A mask the
    caller passes (``mask_time_indices``) is an input and still applies."""
    changed = host_random_settings(model) if training else []
    for obj, name, _ in changed:
        setattr(obj, name, 0.0)
    if changed:
        names = sorted({f"{n}={v:g}" for _, n, v in changed})
        spec = any(n.startswith("mask_") for _, n, _ in changed)
        warnings.warn(f"{type(model).__name__} has {', '.join(names)}: LayerDrop/SpecAugment decide on the host (a "
                      "Python branch on torch.rand, numpy masks), which no traced graph can hold, so peftfx's training "
                      "graph runs every layer" + (" and draws no SpecAugment mask (pass mask_time_indices as an "
                      "input to mask time steps you choose)" if spec else "") + ".", stacklevel=3)
    try:
        yield
    finally:
        for obj, name, value in changed:
            setattr(obj, name, value)


def host_random_settings(model: nn.Module) -> list[tuple[Any, str, Any]]:
    """``(object, name, value)`` of every LayerDrop/SpecAugment setting that is on (``_HOST_RANDOM``, > 0), on the
    model's modules and configs."""
    changed: list[tuple[Any, str, Any]] = []
    seen: set[int] = set()
    for m in model.modules():
        for obj in (m, getattr(m, "config", None)):
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            spec_off = getattr(obj, "apply_spec_augment", True) is False    # Whisper's default: masks unused
            for name, value in list(getattr(obj, "__dict__", {}).items()):   # a dict config has none
                if not _HOST_RANDOM.fullmatch(name) or (spec_off and name.startswith("mask_")):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                    changed.append((obj, name, value))
    return changed


def first_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
