"""What every exporter needs from a :class:`~peftfx.PeftModel`: a flat tensors-in/tensors-out view of it, named
dynamic axes, the same inputs at other shapes (for verification), and the base graph with its adapters cut out.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .._errors import ExportError
from .._util import attr_at
from ..passes.cleanup import _mutates, _same_size
from ..passes.remove import remove_adapters_pass

__all__ = ["FlatModule", "flatten_outputs", "dynamic_axes", "traced_axes", "resize_inputs", "unique_output_names",
           "strip_adapters", "keep_modes", "tensor_inputs", "export_program", "rename_dims"]

BATCH, SEQUENCE, PAST = "batch", "sequence", "past_sequence"


def flatten_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of a model output: ``ModelOutput``/dict keys (``logits``), tuple
    positions (``output_0``), or ``output`` for a lone tensor. ``None`` entries are skipped."""
    items: list[tuple[str, torch.Tensor]] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            items.append((prefix or "output", v))
        elif isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}" if prefix else f"output_{i}", x)
        elif v is not None:
            raise ExportError(f"the model returns {prefix or 'a value'} of type {type(v).__name__}, which ONNX cannot "
                              "carry; return tensors (for Hugging Face models trace with use_cache=False).")

    walk("", out)
    return items


class FlatModule(nn.Module):
    """``forward(*inputs, *adapter_params) -> tuple(outputs)``: ``model`` called with ``input_names`` as keywords;
    when ``param_names`` are given, those parameters of ``model`` are taken from the trailing arguments
    (``torch.func.functional_call``) so that they become graph inputs of the export."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], param_names: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.param_names = list(param_names)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(self.input_names)
        kwargs = dict(zip(self.input_names, args[:n]))
        if self.param_names:
            params = dict(zip(self.param_names, args[n:]))
            out = torch.func.functional_call(self.model, params, (), kwargs, strict=False)
        else:
            out = self.model(**kwargs)
        return tuple(t for _, t in flatten_outputs(out))


def tensor_inputs(kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor inputs only (constants such as ``use_cache=False`` are filled by the model itself)."""
    return {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}


def dynamic_axes(inputs: Mapping[str, torch.Tensor], past: Sequence[str] = ()) -> dict[str, dict[int, str]]:
    """Axis names per input when no trace says better (a model traced with ``dynamic=False``, the cache graph):
    ``batch`` on axis 0; ``sequence`` on axis 1 of token-like inputs (2-D, or 3-D float embeddings)
    (``decoder_sequence`` for ``decoder_*`` inputs), ``past_sequence`` on axis 1 of the cache inputs in ``past``."""
    axes: dict[str, dict[int, str]] = {}
    for name, t in inputs.items():
        if name in past:
            axes[name] = {0: BATCH, 1: PAST}
        elif t.dim() == 0:
            axes[name] = {}
        elif t.dim() == 2 or (t.dim() == 3 and t.is_floating_point()):
            axes[name] = {0: BATCH, 1: _sequence_name(name)}
        else:
            axes[name] = {0: BATCH}
    return axes


def _sequence_name(input_name: str) -> str:
    return f"decoder_{SEQUENCE}" if input_name.startswith("decoder_") else SEQUENCE


def traced_axes(pm, inputs: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str]] | None:
    """The dynamic axes the trace of ``pm`` proved, per input, read from its placeholders' symbolic shapes.

    A dimension is dynamic when its traced size is a symbol (a size the trace fixed, such as Whisper's 80 mel
    bins, stays a number). Inputs sharing a symbol share the axis name, so an encoder's ``sequence`` and a
    decoder's ``decoder_sequence`` stay apart unless the trace proved them equal. Names: ``batch`` for every axis
    0; ``sequence`` (``decoder_sequence`` for ``decoder_*`` inputs) for axis 1; ``{input}_dim{i}`` otherwise or
    when the name is taken by another symbol. A size the trace pinned to 1 (torch.export specialises sizes 0 and
    1) is not a proof: such an axis keeps the name :func:`dynamic_axes` gives it. Returns None when the graph holds
    no symbolic size at all (traced with ``dynamic=False``) or its placeholders cannot be matched to ``inputs``."""
    shapes = _placeholder_shapes(pm)
    if shapes is None or not any(isinstance(d, torch.SymInt) for s in shapes.values() for d in s):
        return None
    fallback = dynamic_axes(inputs)
    found: list[tuple[str, int, Any]] = []          # (input, axis, symbol or None for a unit-pinned axis)
    for name, t in inputs.items():
        shape = shapes.get(name)
        if shape is None or len(shape) != t.dim():
            return None
        for i, d in enumerate(shape):
            if isinstance(d, torch.SymInt):
                expr = d.node.expr
                if getattr(expr, "is_Symbol", False):
                    found.append((name, i, expr))
            elif d == 1 and i in fallback[name]:
                found.append((name, i, None))
    axes: dict[str, dict[int, str]] = {name: {} for name in inputs}
    names: dict[Any, str] = {}
    taken: set[str] = set()
    for name, i, sym in sorted(found, key=lambda f: f[1] != 0):      # axis 0 first: every batch is "batch"
        if sym is not None and sym in names:
            axes[name][i] = names[sym]
            continue
        label = BATCH if i == 0 else _sequence_name(name) if i == 1 else f"{name}_dim{i}"
        if sym is None:
            label = fallback[name][i]
        elif i != 0 and label in taken:
            label = f"{name}_dim{i}"
        axes[name][i] = label
        taken.add(label)
        if sym is not None:
            names[sym] = label
    return axes


def _placeholder_shapes(pm) -> dict[str, tuple] | None:
    """Input name → the traced shape (sizes or SymInts) of its placeholder in ``pm``'s own graph."""
    graph = getattr(pm, "graph", None)
    info = getattr(pm, "peft_info", None)
    if graph is None or info is None:
        return None
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(holders) == len(info.input_names):         # one placeholder per traced input, in the traced order
        pairs = zip(info.input_names, holders)
    else:
        by_name = {n.target: n for n in holders} | {n.name: n for n in holders}
        pairs = ((k, by_name[k]) for k in info.input_names if k in by_name)
    out = {}
    for name, node in pairs:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            out[name] = tuple(val.shape)
    return out


def widen_unit_axes(args: tuple, axes: Sequence[dict[int, str]]) -> tuple:
    """torch.export specialises a dimension of size 1 to the constant 1 (and then refuses to make it dynamic), so
    a batch-1 or one-token example could not be exported with dynamic axes. Every named axis whose size is 1 in
    all the inputs that carry it is traced at size 2 (the rows repeated); the program is the same for any size."""
    sizes: dict[str, set[int]] = {}
    for t, ax in zip(args, axes):
        for i, name in ax.items():
            if isinstance(t, torch.Tensor) and i < t.dim():
                sizes.setdefault(name, set()).add(int(t.shape[i]))
    unit = {name for name, seen in sizes.items() if seen == {1}}
    if not unit:
        return args
    out = []
    for t, ax in zip(args, axes):
        for i, name in ax.items():
            if name in unit and isinstance(t, torch.Tensor) and i < t.dim():
                t = torch.cat([t, t], dim=i)
        out.append(t)
    return tuple(out) + tuple(args[len(axes):])


def export_program(flat: FlatModule, args: tuple, axes: Sequence[dict[int, str]]):
    """``torch.export`` of ``flat`` with every named axis dynamic (``Dim.DYNAMIC``: guards the model implies, such
    as BERT's 512 positions, become range constraints instead of errors; :func:`rename_dims` names the axes in the
    ONNX file). Returns (program, {axis name: (smallest, largest or None) size to try})."""
    from torch.export import Dim

    args = widen_unit_axes(args, axes)
    spec = (tuple({i: Dim.DYNAMIC for i in a} or None for a in axes),)
    try:
        ep = torch.export.export(flat, args, dynamic_shapes=spec, strict=False)
    except Exception as e:  # torch.export raises many types
        raise _export_error(e) from e
    return ep, _limits(ep, axes)


def _limits(ep, axes: Sequence[dict[int, str]]) -> dict[str, tuple[int, int | None]]:
    """{axis name: (smallest size worth trying, largest size the model accepts or None)} from the program's range
    constraints (BERT's 512 positions; a lower bound above torch.export's default 2, e.g. a convolution's kernel)."""
    user = set(ep.graph_signature.user_inputs)
    nodes = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    limits: dict[str, tuple[int, int | None]] = {}
    for node, ax in zip(nodes, axes):
        val = node.meta.get("val")
        for i, name in ax.items():
            size = val.shape[i] if val is not None and i < val.dim() else None
            expr = getattr(getattr(size, "node", None), "expr", None)
            rng = ep.range_constraints.get(expr) if expr is not None else None
            if rng is None:
                continue
            lo, hi = limits.get(name, (1, None))
            lo = max(lo, _as_int(rng.lower, 1) if _as_int(rng.lower, 1) > 2 else 1)
            upper = _as_int(rng.upper, None)
            hi = upper if hi is None else hi if upper is None else min(hi, upper)
            limits[name] = (lo, hi)
    return limits


def _as_int(v, default):
    if not getattr(v, "is_finite", True):                 # unbounded (int_oo)
        return default
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return default


def _export_error(e: Exception) -> ExportError:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    summary = next((ln for ln in lines if "Exception summary" not in ln and not ln.startswith(("[", "-", "#"))),
                   type(e).__name__)
    return ExportError(f"torch.export could not capture the model for ONNX: {type(e).__name__}: {summary[:300]}. "
                       "Check that the model runs on the example inputs; an op torch.export does not support "
                       "must be replaced in the model.")


def dim_renamer(axes: Mapping[str, dict[int, str]], inputs) -> Callable[[str], str] | None:
    """The exporter's symbols (``s17``) → the axis names given for the graph inputs, as a function of a dim's text
    (an expression such as ``s17 + s42`` too); None when no input symbol is named. ``inputs``: (input name, its dims'
    symbolic texts, None for a fixed dim)."""
    table: dict[str, str] = {}
    for input_name, dims in inputs:
        for i, d in enumerate(dims):
            name = axes.get(input_name, {}).get(i)
            if name and d and re.fullmatch(r"s\d+", d):
                table[d] = name
    if not table:
        return None
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, table)) + r")\b")
    return lambda text: pattern.sub(lambda m: table[m.group(1)], text)


def rename_dims(model_proto, axes: Mapping[str, dict[int, str]]) -> None:
    """Replace the exporter's symbols (``s17``) by the axis names given for the graph inputs, everywhere they appear
    (outputs read ``past_sequence + sequence``)."""
    graph = model_proto.graph
    rename = dim_renamer(axes, ((i.name, [d.dim_param for d in i.type.tensor_type.shape.dim]) for i in graph.input))
    if rename is None:
        return
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = rename(d.dim_param)


def resize_inputs(inputs: Mapping[str, torch.Tensor], axes: Mapping[str, dict[int, str]],
                  sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The example inputs with each named axis at ``sizes[name]``: rows and columns repeated cyclically, so token
    ids stay in the vocabulary and masks keep their pattern. Axes not named in ``sizes`` keep their size."""
    out = {}
    for name, t in inputs.items():
        for i, axis in axes.get(name, {}).items():
            if axis in sizes and i < t.dim() and t.shape[i] != sizes[axis]:
                t = t.index_select(i, torch.arange(sizes[axis], device=t.device) % t.shape[i])
        out[name] = t
    return out


def unique_output_names(outputs: Sequence[str], inputs: Sequence[str]) -> list[str]:
    """ONNX names every value once, so an output named like an input (a diffusion UNet's ``sample`` in and out)
    becomes ``out_sample`` (``out_out_sample`` … until the name is free); other names are kept."""
    used = set(inputs)
    out = []
    for name in outputs:
        while name in used:
            name = f"out_{name}"
        used.add(name)
        out.append(name)
    return out


def strip_adapters(pm) -> Any:
    """A fork of ``pm`` computing the base model: every adapter node is cut out (an output adapter's node is
    replaced by the site's output, an input adapter's by its input). Parameters are shared, nothing is changed."""
    out = remove_adapters_pass(pm.fork(), keep_modules=True).graph_module
    # a single-graph model: the fork's other (mode, signature) graphs would be re-traced from the original module
    # with the adapters spliced back in (peftfx.variants), which is not the base model
    out.__dict__.pop("_peftfx_variants", None)
    return out


@contextlib.contextmanager
def keep_modes(*modules: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag (and a PeftModel's graph mode) on exit."""
    roots = [m for m in modules if m is not None]
    saved = {id(m): (m, m.training) for root in roots for m in root.modules()}
    try:
        yield
    finally:
        for root in roots:
            if hasattr(root, "_graph_mode"):      # a PeftModel rewrites its dropout nodes on train()/eval()
                root.train(saved[id(root)][1])
        for m, flag in saved.values():
            m.training = flag


class NotReusable(Exception):
    """The traced graph cannot be handed to the ONNX exporter as it is; the message says why (logged, and the
    export takes a fresh ``torch.export`` instead)."""


def program_from_graph(work: nn.Module, inputs: Mapping[str, torch.Tensor], names: Sequence[str],
                       axes: Sequence[dict[int, str]], n_outputs: int):
    """The :class:`torch.export.ExportedProgram` of ``work``'s own graph, without a second ``torch.export``.

    ``work`` is a traced (merged, folded) :class:`~peftfx.PeftModel` running one graph: ATen nodes whose
    ``meta["val"]`` are fake tensors with the trace's symbolic sizes, weights read through ``get_attr``. The
    program's graph is that graph with each weight lifted to a placeholder (parameters, buffers, other tensor
    attributes as constants; a tensor reachable under two names is lifted once), the tensor inputs ``names`` in
    that order as user inputs, and the outputs in :func:`flatten_outputs` order — the calling convention of
    ``FlatModule(work, names)``; range constraints are the trace's shape environment's ranges for the input sizes.
    Raises :class:`NotReusable` (with the reason) for a graph this cannot carry: a missing fake value, several fake
    modes, a call of a submodule, an input not given or a non-tensor input the graph reads, an input whose dtype,
    device, rank or fixed size differs from the trace's, an output that is not a tensor, or a named axis whose
    traced size is not a symbol. Returns (program, limits as :func:`export_program`)."""
    from torch.export.exported_program import (
        ExportedProgram,
        ModuleCallEntry,
        ModuleCallSignature,
    )
    from torch.export.graph_signature import (
        ExportGraphSignature,
        InputKind,
        InputSpec,
        OutputKind,
        OutputSpec,
        TensorArgument,
    )
    from torch.utils import _pytree as pytree

    graph = getattr(work, "graph", None)
    info = getattr(work, "peft_info", None)
    if not isinstance(graph, torch.fx.Graph) or info is None:
        raise NotReusable("the model is not a traced graph")
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(holders) != len(info.input_names):
        raise NotReusable(f"{len(holders)} placeholders for {len(info.input_names)} traced inputs")
    by_input = dict(zip(info.input_names, holders))
    fake_modes = set()
    for node in graph.nodes:
        if node.op == "call_module":
            raise NotReusable(f"the graph calls the submodule {node.target!r}")
        if node.op in ("output", "placeholder"):
            continue
        val = node.meta.get("val")
        if val is None and node.op != "get_attr" and node.users:     # (a runtime assertion returns nothing)
            raise NotReusable(f"node {node.name} has no fake value")
        for v in pytree.tree_leaves(val):
            if isinstance(v, torch._subclasses.FakeTensor):
                fake_modes.add(v.fake_mode)
    if len(fake_modes) != 1:
        raise NotReusable(f"{len(fake_modes)} fake modes in the graph")
    fake_mode = fake_modes.pop()
    for name, node in by_input.items():
        if name not in names and node.users:
            raise NotReusable(f"the graph reads the input {name!r}, which the export does not give")
    for name in names:
        val = by_input[name].meta.get("val") if name in by_input else None
        if not isinstance(val, torch.Tensor):
            raise NotReusable(f"the input {name!r} is not a tensor placeholder of the graph")
        given = inputs[name]
        if (val.dtype, val.device.type, val.dim()) != (given.dtype, given.device.type, given.dim()) or any(
                not isinstance(d, torch.SymInt) and d != g for d, g in zip(val.shape, given.shape)):
            raise NotReusable(f"the input {name!r} is {given.dtype} {tuple(given.shape)} on {given.device.type}, "
                              f"the trace took {val.dtype} {tuple(val.shape)} on {val.device.type}")

    sizes = {d.node.expr for n in names for d in by_input[n].meta["val"].shape
             if isinstance(d, torch.SymInt) and getattr(d.node.expr, "is_Symbol", False)}
    for name, ax in zip(names, axes):
        shape = by_input[name].meta["val"].shape
        for i in ax:
            if i >= len(shape) or not (isinstance(shape[i], torch.SymInt) and shape[i].node.expr in sizes):
                raise NotReusable(f"axis {i} of {name!r} is named dynamic but its traced size is "
                                  f"{shape[i] if i < len(shape) else 'absent'}")

    # the weights: one placeholder per distinct tensor, parameters, then buffers, then constants (signature order)
    params = dict(work.named_parameters(remove_duplicate=False))
    buffers = dict(work.named_buffers(remove_duplicate=False))
    nonpersistent = {f"{m}.{b}" if m else b for m, mod in work.named_modules()
                     for b in getattr(mod, "_non_persistent_buffers_set", ())}
    lifted: dict[int, tuple[str, InputKind, torch.Tensor, Any]] = {}     # id(tensor) → (name, kind, tensor, val)
    attr_of: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        target = str(node.target)
        if target in params:
            t, kind = params[target], InputKind.PARAMETER
        elif target in buffers:
            t, kind = buffers[target], InputKind.BUFFER
        else:
            t = attr_at(work, target)
            if not isinstance(t, torch.Tensor):
                raise NotReusable(f"get_attr {target!r} is a {type(t).__name__}, not a tensor")
            kind = InputKind.CONSTANT_TENSOR
        if id(t) not in lifted:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or tuple(val.shape) != tuple(t.shape) or val.dtype != t.dtype:
                val = fake_mode.from_tensor(t, static_shapes=True)
            lifted[id(t)] = (target, kind, t, val)
        attr_of[node] = id(t)

    new = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    specs: list[InputSpec] = []
    holder_of: dict[int, torch.fx.Node] = {}
    order = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    prefix = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}
    for kind in order:
        for key, (target, k, t, val) in lifted.items():
            if k is not kind:
                continue
            ph = new.placeholder(prefix[kind] + re.sub(r"\W", "_", target))
            ph.meta["val"] = val
            holder_of[key] = ph
            specs.append(InputSpec(kind, TensorArgument(ph.name), target,
                                   persistent=(target not in nonpersistent) if kind is InputKind.BUFFER else None))
    for name in names:
        old = by_input[name]
        ph = new.placeholder(old.name)
        ph.meta.update(old.meta)
        env[old] = ph
        specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(ph.name), None))
    for name, node in by_input.items():
        if name not in names:
            env[node] = node.meta.get("val")        # an unread non-tensor input (use_cache=False)
    for node in graph.nodes:
        if node.op == "get_attr":
            env[node] = holder_of[attr_of[node]]
        elif node.op in ("call_function", "call_method"):
            env[node] = new.node_copy(node, lambda n: env[n])
        elif node.op == "output":
            outs = _ordered_outputs(work, node, env, n_outputs)
            out = new.output(tuple(outs))
            out.meta.update(node.meta)

    _functionalize_sole_inplace(new)
    root = nn.Module()
    state_dict, constants = {}, {}
    for target, kind, t, _ in lifted.values():
        if kind is InputKind.CONSTANT_TENSOR:
            constants[target] = t
        else:
            state_dict[target] = t
    gm = torch.fx.GraphModule(root, new)
    signature = ExportGraphSignature(
        input_specs=specs,
        output_specs=[OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(o.name), None) for o in outs])
    shape_env = fake_mode.shape_env
    ranges = {s: shape_env.var_to_range[s] for s in sizes if s in shape_env.var_to_range}
    in_spec = pytree.tree_structure(((tuple(inputs[n] for n in names)), {}))
    out_spec = pytree.tree_structure(tuple(range(len(outs))))
    call = [ModuleCallEntry("", ModuleCallSignature(inputs=[], outputs=[], in_spec=in_spec, out_spec=out_spec))]
    try:
        ep = ExportedProgram(root=gm, graph=gm.graph, graph_signature=signature, state_dict=state_dict,
                             range_constraints=ranges, module_call_graph=call, constants=constants)
    except Exception as e:  # the program's verifier: say what it refused
        raise NotReusable(f"torch.export refused the program: {type(e).__name__}: {str(e)[:200]}") from e
    return ep, _limits(ep, axes)


def _ordered_outputs(work: nn.Module, node: torch.fx.Node, env: dict, n_outputs: int) -> list:
    """The graph's output leaves in :func:`flatten_outputs` order (the order FlatModule returns them in)."""
    from torch.utils import _pytree as pytree

    leaves = list(pytree.tree_leaves(node.args[0]))
    info = getattr(work.graph._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        if info.out_spec.num_leaves != len(leaves):
            raise NotReusable("the graph's outputs do not match its output structure")
        marked = pytree.tree_unflatten([torch.tensor(i) for i in range(len(leaves))], info.out_spec)
        order = [int(t) for _, t in flatten_outputs(marked)]
    else:
        order = list(range(len(leaves)))
    outs = []
    for i in order:
        leaf = leaves[i]
        if not isinstance(leaf, torch.fx.Node) or not isinstance(leaf.meta.get("val"), torch.Tensor):
            raise NotReusable(f"output {i} of the graph is not a tensor")
        outs.append(env[leaf])
    if len(outs) != n_outputs:
        raise NotReusable(f"the graph has {len(outs)} tensor outputs, the model returned {n_outputs}")
    return outs


def _to_copy_args(node: torch.fx.Node) -> torch.dtype | None:
    """The dtype an ``aten.to`` overload converts to (None: the input's own)."""
    name = node.target._overloadname if isinstance(node.target, torch._ops.OpOverload) else ""
    if name == "dtype":
        return node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
    if name == "device":
        return node.kwargs.get("dtype", node.args[2] if len(node.args) > 2 else None)
    if name == "other":
        other = node.args[1].meta.get("val") if isinstance(node.args[1], torch.fx.Node) else node.args[1]
        return getattr(other, "dtype", None)
    if name == "dtype_layout":
        return node.kwargs.get("dtype")
    return None


def rewrite_untranslatable(gm: torch.fx.GraphModule, translatable) -> int:
    """Rewrite, in place, the nodes whose op has no ONNX translation (``translatable(op)`` is false) and that are
    the same computation as ops that have one — ATen's own definitions, on one node at a time, instead of the
    exporter's decomposition step (a re-trace of the whole graph):

    * ``aten.to`` (``dtype``, ``device``, ``dtype_layout``, ``other``) → ``aten._to_copy(x, dtype=…)`` (ONNX has one
      device: only the dtype matters; no dtype → the input itself);
    * ``aten.__and__/__or__/__xor__.Tensor`` → ``aten.bitwise_*.Tensor``; ``aten.min/max.other`` →
      ``aten.minimum/maximum``;
    * ``aten.diff(x, n=1, dim, prepend, append)`` → ``cat([prepend, x, append])``, then the slice from 1 minus the
      slice to −1 along ``dim`` (``!=`` for booleans, as ``torch.diff``).

    Each new node carries the replaced node's metadata and a fake value computed in the graph's fake mode (the
    symbolic sizes stay symbolic). Other nodes are left as they are. A graph with an op that mutates its input is
    left unchanged (``aten.to`` may return its input, which such an op would then change). Returns how many nodes
    were rewritten."""
    aten = torch.ops.aten
    if any(_mutates(n) for n in gm.graph.nodes):
        return 0
    simple = {aten.__and__.Tensor: aten.bitwise_and.Tensor, aten.__or__.Tensor: aten.bitwise_or.Tensor,
              aten.__xor__.Tensor: aten.bitwise_xor.Tensor, aten.min.other: aten.minimum.default,
              aten.max.other: aten.maximum.default}
    to_ops = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other}
    graph, count = gm.graph, 0

    def emit(before, op, args, kwargs=None):
        with graph.inserting_before(before):
            new = graph.call_function(op, tuple(args), kwargs or {})
        new.meta.update({k: v for k, v in before.meta.items() if k != "val"})
        fake = torch.fx.node.map_arg((new.args, new.kwargs), lambda n: n.meta["val"])
        new.meta["val"] = op(*fake[0], **fake[1])
        return new

    for node in list(graph.nodes):
        if node.op != "call_function" or translatable(node.target):
            continue
        if node.target in simple and translatable(simple[node.target]) and not node.kwargs:
            new = emit(node, simple[node.target], node.args)
        elif node.target in to_ops and translatable(aten._to_copy.default):
            dtype = _to_copy_args(node)
            new = emit(node, aten._to_copy.default, node.args[:1], {"dtype": dtype}) if dtype is not None \
                else node.args[0]
        elif node.target is aten.diff.default and _diff_once(node):
            x, _, dim, prepend, append = _diff_args(node)
            parts = [p for p in (prepend, x, append) if p is not None]
            if len(parts) > 1:
                x = emit(node, aten.cat.default, [parts, dim])
            hi = emit(node, aten.slice.Tensor, [x, dim, 1, 2**63 - 1])
            lo = emit(node, aten.slice.Tensor, [x, dim, 0, -1])
            op = aten.ne.Tensor if node.meta["val"].dtype == torch.bool else aten.sub.Tensor
            new = emit(node, op, [hi, lo])
        else:
            continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


def _diff_args(node: torch.fx.Node) -> tuple:
    names = ("self", "n", "dim", "prepend", "append")
    defaults = (None, 1, -1, None, None)
    vals = list(node.args) + list(defaults[len(node.args):])
    return tuple(node.kwargs.get(k, v) for k, v in zip(names, vals))


def _diff_once(node: torch.fx.Node) -> bool:
    _, n, _, prepend, append = _diff_args(node)
    return n == 1 and all(p is None or isinstance(p, torch.fx.Node) for p in (prepend, append))


def drop_identity_reshapes(gm: torch.fx.GraphModule) -> int:
    """Remove, in place, every ``aten.reshape``/``aten.view`` whose result has its input's shape (the same sizes,
    symbol for symbol, per the nodes' fake values): the node computes its input. ``torch.export``'s re-trace drops
    them (a Hugging Face attention's ``reshape`` of the SDPA output to its own shape is one); left in, they sit
    between the ops ONNX Runtime's attention fusion matches. A graph with an op that mutates its input is left
    unchanged (a view shares its input's storage). Returns how many were removed."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    if any(_mutates(n) for n in nodes):
        return 0
    ops = {torch.ops.aten.reshape.default, torch.ops.aten.view.default}
    count = 0
    for node in nodes:
        if node.target not in ops or not isinstance(node.args[0], torch.fx.Node):
            continue
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and _same_shape(src.shape, out.shape):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    if count:
        gm.recompile()
    return count


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_same_size(x, y) for x, y in zip(a, b))


def _functionalize_sole_inplace(graph: torch.fx.Graph) -> int:
    """Replace, in place, each in-place ATen op (``aten.add_``) whose mutated argument is a fresh tensor used by it
    alone — made by an op that returns new storage, not a view, and read by no other node — with its out-of-place
    overload (``aten.add``): nothing else can see the mutation, so the value is the same (T5's ``position_bias +=``,
    Falcon's ``mlp_output += attention_output``). Only where the out-of-place result has the in-place result's
    dtype and shape (type promotion could differ). Returns how many were replaced; other in-place ops stay (the
    program then refuses the graph and the export takes a fresh ``torch.export``)."""
    count = 0
    for node in list(graph.nodes):
        target = node.target
        schema = getattr(target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable or not node.args:
            continue
        name = schema.name.split("::")[-1]
        first = schema.arguments[0].alias_info if schema.arguments else None
        if not name.endswith("_") or first is None or not first.is_write:
            continue
        packet = getattr(torch.ops.aten, name[:-1], None)
        functional = getattr(packet, target._overloadname, None) if packet is not None else None
        src = node.args[0]
        if functional is None or not isinstance(src, torch.fx.Node) or src.op != "call_function" or len(src.users) != 1:
            continue
        src_schema = getattr(src.target, "_schema", None)
        if src_schema is None or src_schema.is_mutable or any(r.alias_info is not None for r in src_schema.returns):
            continue
        fake = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        with contextlib.suppress(RuntimeError, TypeError, ValueError):     # a fake kernel's refusal: val stays None
            val = None
            val = functional(*fake[0], **fake[1])
        old = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(old, torch.Tensor) or val.dtype != old.dtype \
                or not _same_shape(val.shape, old.shape):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(functional, node.args, node.kwargs)
        new.meta.update(node.meta)
        new.meta["val"] = val
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count
