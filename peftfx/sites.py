"""Sites: the places in a traced graph where a weight meets an activation.

A site is any matmul one of whose operands is a parameter, whatever module wrapped it:
``aten.linear(x, W[out,in])``, ``aten.addmm(b, x, W[in,out])`` (GPT-2's ``Conv1D``), ``aten.mm``/``aten.matmul``
with a parameter (directly or through a transpose: ``t``, ``numpy_T``, ``transpose``, ``permute``), and
``aten.embedding(W, ids)``. Every matrix site exposes its weight in one canonical ``[out, in]`` orientation so
methods never branch on the op.

Kinds (:data:`KINDS`; a method takes only the kinds in its ``site_kinds`` whitelist):
  ``linear``     ``[out, in]`` stored as is (``linear``, ``x @ W.T``)
  ``linear_t``   stored ``[in, out]`` (``addmm``/``mm``/``matmul`` with the bare parameter: GPT-2's ``Conv1D``)
  ``embedding``  a table ``[vocab, dim]`` read by ids
  ``conv``       ``aten.conv1d/conv2d/conv3d`` (either overload: int or string padding) or a non-transposed
                 ``aten.convolution`` — ``nn.Conv1d/2d/3d``; the weight ``[out, in/groups, *kernel]`` is kept as
                 stored (its canonical form is itself) and ``site.conv`` holds stride, padding, dilation, groups.
                 Transposed convolutions are not sites.
  ``experts``    a 3-D parameter holding one matrix per expert (transformers-5 MoE blocks: ``experts.gate_up_proj``
                 ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``) whose every use is a product with an
                 activation: gathered by expert id and multiplied (``index`` → ``bmm``, the ``batched_mm``
                 implementation), read whole by a grouped matmul (``transformers.grouped_mm_fallback`` /
                 ``aten._grouped_mm``, through a transpose), or picked per expert (``select`` → ``linear``/``mm``).
                 The site is the parameter itself (its ``get_attr`` node; key = the parameter's qualified name);
                 adapters act on the weight as stored (``W ↦ W + ΔW`` per expert), so every consumer sees them.
                 ``site.experts`` holds the expert count and whether each expert matrix is stored ``[in, out]``.

A site's ``path`` is the module that owns its weight when that is a submodule of the module that ran the op
(``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``: the site is ``mha.out_proj``,
its ``module_type`` the module that ran it, ``MultiheadAttention``); otherwise the module that ran the op.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = ["Site", "ConvSpec", "find_sites", "canonical_weight", "site_input", "set_site_input", "conv_spec",
           "WEIGHT_INDEX", "KINDS", "Unadaptable", "unadaptable_modules", "ExpertSpec", "slice_ranges",
           "site_calls", "call_index"]

aten = torch.ops.aten

#: kind → how the stored weight relates to the canonical [out, in] matrix
KINDS = ("linear", "linear_t", "embedding", "conv", "experts")


@dataclass(frozen=True)
class ConvSpec:
    """How a convolution site slides its kernel: per spatial dimension stride, padding (or ``"same"``/``"valid"``)
    and dilation, and the channel groups."""

    dims: int                              # 1, 2 or 3 spatial dimensions
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1

    def describe(self) -> dict[str, Any]:
        return {"dims": self.dims, "stride": list(self.stride), "dilation": list(self.dilation), "groups": self.groups,
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding)}


@dataclass(frozen=True)
class ExpertSpec:
    """How a 3-D expert weight ``[E, a, b]`` is used: ``transposed`` when each expert's matrix is stored
    ``[in, out]`` (``x @ W[e]``) rather than ``[out, in]``; ``products`` the product nodes that read it (for the role
    detectors); ``siblings`` the expert-weight names of the owning module in registration order."""

    num_experts: int
    transposed: bool
    consumer: str                          # op of the product: "bmm", "grouped_mm_fallback", "linear", …
    products: tuple = ()
    siblings: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "transposed": self.transposed, "consumer": self.consumer,
                "siblings": list(self.siblings)}


@dataclass(eq=False)
class Site:
    node: fx.Node
    key: str                     # unique, stable name: module path (plus weight name / call index if shared)
    path: str                    # qualified module path of the module that ran the op
    layer: int | None
    module_type: str
    op: str                      # "linear", "addmm", "mm", "matmul", "embedding"
    kind: str                    # one of KINDS
    weight: str                  # get_attr target of the weight parameter
    weight_shape: tuple[int, ...]
    bias: str | None = None
    roles: set[str] = field(default_factory=set)
    # role → output rows of a fused projection (QKV, gate/up): (start, end), or a tuple of ranges when the rows are
    # interleaved per head (see slice_ranges)
    slices: dict[str, Any] = field(default_factory=dict)
    conv: ConvSpec | None = None           # kind "conv": stride, padding, dilation, groups
    experts: ExpertSpec | None = None      # kind "experts": expert count, orientation
    calls: tuple[fx.Node, ...] = ()        # further calls of a module called several times (one adapter for all)

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        """Every node that runs this site's weight: ``node`` and then ``calls``."""
        return (self.node, *self.calls)

    @property
    def in_features(self) -> int:
        """Input features (input channels of a convolution)."""
        if self.kind == "conv":
            return self.weight_shape[1] * self.conv.groups
        if self.kind == "experts":
            return self.weight_shape[1 if self.experts.transposed else 2]
        return self.weight_shape[1] if self.kind == "linear" else self.weight_shape[0]

    @property
    def out_features(self) -> int:
        """Output features (output channels of a convolution)."""
        if self.kind == "experts":
            return self.weight_shape[2 if self.experts.transposed else 1]
        return self.weight_shape[0] if self.kind in ("linear", "conv") else self.weight_shape[1]

    @property
    def input(self) -> fx.Node | None:
        """The activation operand (token ids for an embedding; None for an ``experts`` weight, which adapters
        change as a weight, whatever reads it)."""
        return site_input(self.node, self.op)

    @property
    def bias_operand(self) -> Any:
        """The bias the op adds (a node, or None): ``bias`` names it only when it is a parameter."""
        i = _BIAS_INDEX.get(self.op)
        args = self.node.args
        return args[i] if i is not None and len(args) > i else None

    def with_roles(self, roles: set[str]) -> "Site":
        return dataclasses.replace(self, roles=set(roles))

    def describe(self) -> dict[str, Any]:
        out = {"key": self.key, "path": self.path, "layer": self.layer, "module_type": self.module_type,
               "op": self.op, "kind": self.kind, "weight": self.weight, "weight_shape": list(self.weight_shape),
               "bias": self.bias,
               "roles": sorted(self.roles), "slices": {k: _jsonable(v) for k, v in self.slices.items()}}
        if self.conv is not None:
            out["conv"] = self.conv.describe()
        if self.experts is not None:
            out["experts"] = self.experts.describe()
        if self.calls:
            out["calls"] = 1 + len(self.calls)
        return out


def slice_ranges(span: Any) -> list[tuple[int, int]]:
    """A ``Site.slices`` value as its sorted row ranges: ``(s, e)`` → ``[(s, e)]``; a tuple of ranges (rows
    interleaved per head) → the ranges."""
    return [(int(span[0]), int(span[1]))] if isinstance(span[0], int) else [(int(s), int(e)) for s, e in span]


def _jsonable(span: Any) -> list:
    return list(span) if isinstance(span[0], int) else [list(r) for r in span]


_CONV_OPS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
             aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
#: op name → index of the activation operand
_INPUT_INDEX = {"linear": 0, "addmm": 1, "embedding": 1, "mm": 0, "matmul": 0,
                "conv1d": 0, "conv2d": 0, "conv3d": 0, "convolution": 0}
#: op name → index of the bias operand (ops that add one)
_BIAS_INDEX = {"linear": 2, "addmm": 0, "conv1d": 2, "conv2d": 2, "conv3d": 2, "convolution": 2}
#: op name → index of the weight operand
WEIGHT_INDEX = {"linear": 1, "addmm": 2, "embedding": 0, "mm": 1, "matmul": 1,
                "conv1d": 1, "conv2d": 1, "conv3d": 1, "convolution": 1}


def site_input(node: fx.Node, op: str) -> fx.Node | None:
    """The activation operand of a site node of the given op (None for an ``experts`` weight: its adapters are
    called ``m(None, W)`` and return the adapted weight)."""
    if op == "experts":
        return None
    return node.args[_INPUT_INDEX[op]]


def set_site_input(node: fx.Node, op: str, new: fx.Node) -> None:
    args = list(node.args)
    args[_INPUT_INDEX[op]] = new
    node.args = tuple(args)


def canonical_weight(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A view of ``weight`` as ``[out, in]`` (in-place updates of the view update the weight); a convolution's
    weight ``[out, in/groups, *kernel]`` and an ``experts`` weight ``[E, a, b]`` as stored."""
    return weight if kind in ("linear", "conv", "experts") else weight.t()


def _param_attr(gm: fx.GraphModule, node: Any, dims: tuple[int, ...] = (2,)) -> tuple[str, torch.Tensor] | None:
    if isinstance(node, fx.Node) and node.op == "call_module" and "dequant_of" in node.meta.get("peftfx", {}):
        # a quantized base weight (peftfx.quant): the dequantizer stands in for the parameter it replaced
        w = gm.get_submodule(node.target).weight_meta
        return (node.meta["peftfx"]["dequant_of"], w) if w.dim() in dims else None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        t = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return (node.target, t) if t.dim() in dims else None


def _ints(value: Any, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def conv_spec(node: fx.Node) -> ConvSpec | None:
    """Stride, padding, dilation and groups of a convolution node (``None`` for a transposed one)."""
    t, a = node.target, list(node.args) + [None] * 9
    kw = node.kwargs
    if t in _CONV_OPS:
        n = _CONV_OPS[t]
        stride, padding, dilation, groups = (kw.get(k, a[i]) for i, k in
                                             enumerate(("stride", "padding", "dilation", "groups"), 3))
        pad = padding if isinstance(padding, str) else _ints(padding, n, 0)
        return ConvSpec(n, _ints(stride, n, 1), pad, _ints(dilation, n, 1), int(groups or 1))
    if t is aten.convolution.default and not a[6]:
        n = len(node.args[1].meta["val"].shape) - 2 if "val" in node.args[1].meta else len(a[3])
        return ConvSpec(n, _ints(a[3], n, 1), _ints(a[4], n, 0), _ints(a[5], n, 1), int(a[8] or 1))
    return None


# ``x @ W.t()``, ``x @ W.T`` (numpy_T: Falcon's FalconLinear), ``x @ W.transpose(0, 1)``, ``x @ W.permute(1, 0)``
_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int)


def _match(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str, Any, Any] | None:
    """(op, kind, weight get_attr target, bias target) if ``node`` is a weight matmul."""
    t, a = node.target, node.args
    if t is aten.linear.default:
        w = _param_attr(gm, a[1])
        b = a[2] if len(a) > 2 else None
        return ("linear", "linear", w, b) if w else None
    if t is aten.addmm.default:
        w = _param_attr(gm, a[2])
        return ("addmm", "linear_t", w, a[0]) if w else None
    if t in (aten.mm.default, aten.matmul.default):
        w = _param_attr(gm, a[1])
        if w:
            return (t._opname, "linear_t", w, None)
        src = a[1]
        if isinstance(src, fx.Node) and src.target in _TRANSPOSES:
            w = _param_attr(gm, src.args[0])
            if w and (src.target in (aten.t.default, aten.numpy_T.default) or len(src.args) == 1 or
                      sorted(int(d) % 2 for d in (src.args[1] if src.target is aten.permute.default
                                                  else src.args[1:3])) == [0, 1]):
                return (t._opname, "linear", w, None)
        return None
    if t is aten.embedding.default:
        w = _param_attr(gm, a[0])
        return ("embedding", "embedding", w, None) if w else None
    if t in _CONV_OPS or (t is aten.convolution.default and not a[6]):
        w = _param_attr(gm, a[1], dims=(3, 4, 5))
        b = a[2] if len(a) > 2 else None
        return (t._opname, "conv", w, b) if w else None
    return None


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every weight matmul in graph order, each with a unique ``key``. A module called several times (ALBERT's
    shared layer) is one site per weight: its first call is ``node``, the others ``calls`` (Hugging Face PEFT's
    semantics: one adapter per module, applied at every call)."""
    found: list[tuple[fx.Node, str, str, str, tuple, Any]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        m = _match(gm, node)
        if m is None:
            continue
        op, kind, (wname, w), bias = m
        found.append((node, op, kind, wname, tuple(w.shape), bias))
    ran = {_path_of(n) for n in gm.graph.nodes if n.op == "call_function"}
    paths = [_site_path(node, wname, ran) for node, _, _, wname, _, _ in found]
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, ((_, op, _, wname, _, _), path) in enumerate(zip(found, paths)):
        groups.setdefault((wname, op, path), []).append(i)
    by_path: dict[str, int] = {}
    for _, _, p in groups:
        by_path[p] = by_path.get(p, 0) + 1
    sites: list[Site] = []
    seen: dict[str, int] = {}
    for (wname, _, path), idx in groups.items():
        node, op, kind, _, shape, bias = found[idx[0]]
        info = node.meta.get("peftfx", {})
        key = path if by_path[path] == 1 else (f"{path}.{wname.rsplit('.', 1)[-1]}" if path else wname)
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n:
            key = f"{key}#{n}"
        bias_name = bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
        sites.append(Site(node=node, key=key, path=path, layer=info.get("layer"),
                          module_type=info.get("module_type", ""), op=op, kind=kind, weight=wname,
                          weight_shape=shape, bias=bias_name, conv=conv_spec(node) if kind == "conv" else None,
                          calls=tuple(found[i][0] for i in idx[1:])))
    return _with_experts(gm, sites)


def _with_experts(gm: fx.GraphModule, sites: list[Site]) -> list[Site]:
    """``sites`` plus one ``experts`` site per 3-D expert weight, all in graph order (an expert weight placed at its
    first product)."""
    found = _expert_sites(gm)
    if not found:
        return sites
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pos = {id(s): order[s.experts.products[0] if s.kind == "experts" else s.node] for s in sites + found}
    return sorted(sites + found, key=lambda s: pos[id(s)])


# ------------------------------------------------------------------------------------------- expert weights
#: ops a 3-D expert weight may pass through on its way to a product: gather by expert id, pick one expert, dtype
#: casts and aliases (the last two matrix dimensions keep their order), and transposes (they swap them)
_KEEP = {aten.index.Tensor, aten.select.int, aten.alias.default, aten.contiguous.default, aten.clone.default,
         aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.to.device}
_SWAP = {aten.transpose.int, aten.t.default, aten.numpy_T.default, aten.permute.default}
_GROUPED = {"grouped_mm_fallback", "_grouped_mm", "grouped_mm"}      # (x, w, offs): x @ w[group]


def _swaps(node: fx.Node) -> bool | None:
    """Whether a transpose-like node swaps the last two dimensions (None: it moves others too)."""
    val = node.args[0].meta.get("val")
    nd = val.dim() if isinstance(val, torch.Tensor) else 3
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    dims = list(node.args[1]) if node.target is aten.permute.default else None
    if dims is None:
        a, b = sorted(int(d) % nd for d in node.args[1:3])
        return True if (a, b) == (nd - 2, nd - 1) else None
    dims = [int(d) % nd for d in dims]
    return True if dims == list(range(nd - 2)) + [nd - 1, nd - 2] else (False if dims == list(range(nd)) else None)


def _expert_uses(node: fx.Node, flipped: bool = False, depth: int = 0) -> list[tuple[fx.Node, bool]] | None:
    """(product node, whether each expert matrix is stored [in, out]) for every use of ``node``; None if some use
    is not a product with an activation (through :data:`_KEEP` and :data:`_SWAP` ops)."""
    out: list[tuple[fx.Node, bool]] = []
    for user in node.users:
        t, name = user.target, getattr(user.target, "_opname", "")
        if depth > 6 or user.op != "call_function":
            return None
        if t in _KEEP and user.args[0] is node and not (t is aten.index.Tensor and len(user.args[1]) != 1):
            more = _expert_uses(user, flipped, depth + 1)
        elif t in _SWAP and user.args[0] is node and _swaps(user) is not None:
            more = _expert_uses(user, flipped ^ _swaps(user), depth + 1)
        elif t in (aten.bmm.default, aten.matmul.default, aten.mm.default) and user.args[0] is not user.args[1]:
            more = [(user, flipped ^ (user.args[1] is node))]           # W @ x: [out, in]; x @ W: [in, out]
        elif t is aten.linear.default and user.args[1] is node:
            more = [(user, flipped)]
        elif name in _GROUPED and len(user.args) > 1 and user.args[1] is node:
            more = [(user, not flipped)]
        else:
            return None
        if more is None:
            return None
        out += more
    return out


def _expert_sites(gm: fx.GraphModule) -> list[Site]:
    """An ``experts`` site per 3-D floating parameter whose uses are all products with an activation agreeing on
    the orientation of the expert matrices."""
    found = []
    for node in gm.graph.nodes:
        w = _param_attr(gm, node, dims=(3,))
        if w is None or not w[1].is_floating_point() or not node.users:
            continue
        uses = _expert_uses(node)
        if not uses or len({t for _, t in uses}) != 1:
            continue
        first = uses[0][0]
        info, owner = first.meta.get("peftfx", {}), node.target.rsplit(".", 1)[0] if "." in node.target else ""
        spec = ExpertSpec(int(w[1].shape[0]), uses[0][1], _opname(first), tuple(u for u, _ in uses))
        found.append(Site(node=node, key=node.target, path=owner, layer=node.meta.get("peftfx", {}).get("layer"),
                          module_type=info.get("module_type", ""), op="experts", kind="experts",
                          weight=node.target, weight_shape=tuple(w[1].shape), experts=spec))
    by_owner: dict[str, list[str]] = {}
    for s in found:
        by_owner.setdefault(s.path, []).append(s.weight.rsplit(".", 1)[-1])
    for s in found:                        # registration order of the owner's expert weights (HF nests in it)
        try:
            names = [n for n, _ in gm.get_submodule(s.path).named_parameters(recurse=False)] if s.path else []
        except AttributeError:
            names = []
        mine = by_owner[s.path]
        sib = [n for n in names if n in mine] + [n for n in mine if n not in names]
        s.experts = dataclasses.replace(s.experts, siblings=tuple(sib))
    return found


def call_index(gm: fx.GraphModule) -> dict[tuple[Any, Any], list[fx.Node]]:
    """The call_function nodes of ops that can be sites, by (target, the target of the node behind the weight
    operand), in graph order: :func:`site_calls` for many sites in one scan of the graph (valid while no such
    node is added, removed or given another weight: splicing adds modules and rewires activations only)."""
    index: dict[tuple[Any, Any], list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            op = getattr(n.target, "_opname", None)
            if op in WEIGHT_INDEX:
                index.setdefault((n.target, _weight_source(n, op)), []).append(n)
    return index


def site_calls(gm: fx.GraphModule, node: fx.Node,
               index: dict[tuple[Any, Any], list[fx.Node]] | None = None) -> list[fx.Node]:
    """Every call of the site whose (first) call is ``node``: the nodes running the same op on the same weight
    from the same module (one node unless the module is called several times), in graph order. ``index``: from
    :func:`call_index` on this graph, to look candidates up rather than scan every node."""
    m = _match(gm, node) if node.op == "call_function" else None
    if m is None:
        return [node]
    same, key = [], _weight_source(node, m[0])
    if index is not None and getattr(node.target, "_opname", None) == m[0]:
        candidates: Any = index.get((node.target, key), ())
    else:
        candidates = (n for n in gm.graph.nodes if n.op == "call_function" and n.target == node.target
                      and _weight_source(n, m[0]) == key)
    for n in candidates:                   # the same op on the same weight (usually just ``node``)
        o = _match(gm, n)
        if o is not None and o[0] == m[0] and o[2][0] == m[2][0]:
            same.append(n)
    if len(same) < 2:
        return same or [node]
    ran = {_path_of(n) for n in gm.graph.nodes if n.op == "call_function"}
    want = _site_path(node, m[2][0], ran)
    return [n for n in same if _site_path(n, m[2][0], ran) == want]


def _weight_source(node: fx.Node, op: str) -> Any:
    """The target of the node behind a site's weight operand (through one transpose): a cheap filter."""
    args = node.args
    i = WEIGHT_INDEX.get(op)
    a = args[i] if i is not None and len(args) > i else None
    if isinstance(a, fx.Node) and a.op == "call_function" and a.args:
        a = a.args[0]
    return a.target if isinstance(a, fx.Node) else None


def _path_of(node: fx.Node) -> str:
    return node.meta.get("peftfx", {}).get("path", "")


def _site_path(node: fx.Node, weight: str, ran: set[str]) -> str:
    """The module that ran ``node``, or the submodule owning ``weight`` if that module never ran itself."""
    path = _path_of(node)
    owner = weight.rsplit(".", 1)[0] if "." in weight else ""
    if path and owner.startswith(path + ".") and owner not in ran:
        return owner
    return path


# ------------------------------------------------------------------------------------ modules without a site
@dataclass(eq=False)
class Unadaptable:
    """A module whose parameters the graph reads outside any site (a norm, a transposed convolution, a sliced
    MultiheadAttention in-projection): selectors can name it (``key``, ``module_type``, ``layer``) and planning
    then reports ``reason`` instead of adapting part of what the rule names."""

    key: str
    path: str
    layer: int | None
    module_type: str
    op: str
    reason: str
    kind: str = "none"
    roles: frozenset[str] = frozenset()


_NORMS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
          "cudnn_batch_norm", "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm",
          "instance_norm"}
_TRANSPOSED = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


def unadaptable_modules(gm: fx.GraphModule, sites: list[Site]) -> list[Unadaptable]:
    """Every module (by path) that reads a parameter in the graph but holds no site, with the reason in words."""
    have, site_nodes = {s.path for s in sites}, {n for s in sites for n in s.nodes}
    ops: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in site_nodes or \
                not any(_is_parameter(gm, a) for a in node.all_input_nodes):
            continue
        path = _path_of(node)
        if path and path not in have:
            ops.setdefault(path, []).append(node)
    out = []
    for path, nodes in ops.items():
        info = nodes[0].meta.get("peftfx", {})
        names = list(dict.fromkeys(_opname(n) for n in nodes))
        out.append(Unadaptable(path, path, info.get("layer"), info.get("module_type", ""), names[0],
                               _why(path, info.get("module_type", ""), names, nodes)))
    return out


def _is_parameter(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    try:
        gm.get_parameter(node.target)
        return True
    except AttributeError:
        return False


def _opname(node: fx.Node) -> str:
    return getattr(node.target, "_opname", getattr(node.target, "__name__", str(node.target)))


def _why(path: str, module_type: str, names: list[str], nodes: list[fx.Node]) -> str:
    ops = ", ".join(f"aten.{n}" for n in names[:4])
    if module_type == "MultiheadAttention":
        return (f"this nn.MultiheadAttention is called with a query that is not its key and value (cross-attention), "
                f"so it slices in_proj_weight ({ops}) before its matmuls; peftfx adapts a MultiheadAttention's "
                f"in-projection only in self-attention (query is key is value). Its out-projection is the site "
                f"'{path}.out_proj'.")
    if any(n in _NORMS for n in names):
        return (f"a normalisation layer ({module_type or 'module'}, {ops}): its parameters scale and shift "
                "features, they are not a weight matrix; peftfx adapts weight matmuls, convolutions and embedding "
                "lookups")
    if any(n in _TRANSPOSED for n in names) or any(n.target is aten.convolution.default and n.args[6] for n in nodes):
        return (f"a transposed convolution ({module_type or 'module'}, {ops}); peftfx (like Hugging Face PEFT) "
                "adapts ordinary convolutions only")
    return (f"its parameters are read by {ops} ({module_type or 'module'}), not by a weight matmul, convolution or "
            "embedding lookup that peftfx can adapt")
