"""Shared machinery of the virtual-token methods (prompt tuning, p-tuning, prefix tuning).

These methods do not act at one weight site: they change the sequence the model sees. They are *graph-level*
methods (:class:`~peftfx.methods.base.GraphMethod`): ``plan`` calls ``rule.prepare(pm, plan, i)`` (analyse and
validate; nothing changes, every bad input raises here), ``apply_to_graph`` calls ``rule.build_graph(pm, prepared)`` for their modules (recorded
in ``peft_info.adapters`` before checkpoint tensors are loaded) and ``rule.rewrite(pm, prepared, modules)``
after the site adapters are spliced and before freezing.

Their trainable tensors live in *source* modules (:class:`VirtualSource`): a ``call_module`` node with no
inputs that returns the virtual tokens or the key/value prefixes. Everything they compute is
input-independent, so :func:`peftfx.fold` can evaluate it once into constants.

**Widening the sequence (prompt tuning, p-tuning).** A traced graph computes every sequence-length-dependent
quantity — position ids, causal and padding masks, the shapes of every view — from symbolic sizes read off its
inputs (``sym_size(input_ids, 1)``). So instead of chasing those nodes, the inputs themselves are widened by N:
each input whose dimension is the token sequence gets N entries prepended (ids: 0, attention mask: 1, labels:
-100, token types: 0, position ids: 0…N-1 with the real ones shifted by N); the token-embedding output then has
N + S rows and its first N are replaced by the virtual tokens; each output with a sequence dimension is sliced
back to the S real positions. Everything else — positions N…N+S-1 for real tokens, the N+S causal mask in
which real tokens see every virtual token, padding — is the model's own code running on the longer sequence,
exactly as when Hugging Face PEFT passes ``inputs_embeds = cat(prompts, embed(ids))`` and an extended mask.
The trace must have a dynamic sequence dimension (``apply(..., dynamic=True)``, the default).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from .._errors import ConflictError, SiteError
from .._util import tensor_val as _val
from ..model import adapter_name, chain_end
from ..rules import Selector, select
from .base import AdapterModule, GraphMethod

__all__ = [
    "EmbeddingTokensMethod",
    "SequenceEdit",
    "VirtualMethod",
    "VirtualSource",
    "insert_source",
    "plan_sequence",
    "prepend_virtual",
    "record_site",
    "token_embedding",
    "widen_input",
    "widen_sequence",
]

log = logging.getLogger(__name__)

_INT_MAX = 9223372036854775807
_FILL = {"ids": 0, "mask": 1, "labels": -100, "zeros": 0}


# ------------------------------------------------------------------------------------ method contract
class VirtualMethod(GraphMethod):
    """Base of the graph-level virtual-token methods (:class:`~peftfx.methods.base.GraphMethod`); at most one
    virtual-token rule may be applied to a model."""

    virtual_tokens: ClassVar[bool] = True

    def default_targets(self) -> Selector:
        return select.role("embed")

    def check_single(self, plan, index: int) -> None:
        """Two virtual-token rules would both own the front of the sequence: refuse before any change."""
        others = [(j, r) for j, r in enumerate(plan.rules) if j != index and getattr(r, "virtual_tokens", False)]
        if others:
            desc = "; ".join(f"rule {j} ({r.name})" for j, r in [(index, self)] + others)
            raise ConflictError(f"{desc} are all virtual-token methods; a model takes one of prompt tuning, "
                                "p-tuning and prefix tuning. Keep one of these rules (site methods such as "
                                "LoRA or IA3 combine with it freely).")


class EmbeddingTokensMethod(VirtualMethod):
    """Virtual tokens placed before the real tokens at the token-embedding output (prompt tuning, p-tuning).

    Subclasses give ``num_virtual_tokens`` and ``make_source(pm, edit, weight) → VirtualSource``; planning
    (:func:`plan_sequence`), naming, recording and the sequence-widening rewrite are shared."""

    def prepare(self, pm, plan, index: int) -> SequenceEdit:
        self.check_single(plan, index)
        return plan_sequence(pm, plan, self, index, self.num_virtual_tokens)

    def make_source(self, pm, edit: SequenceEdit, weight: torch.Tensor) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def build_graph(self, pm, edit: SequenceEdit) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        module = self.make_source(pm, edit, pm.get_parameter(edit.site.weight))
        name = adapter_name(pm, edit.site.key, self.name)
        edit.names = [name]
        return {name: (module, record_site(edit.site.key, type(module).__name__))}

    def rewrite(self, pm, edit: SequenceEdit, modules: dict[str, nn.Module]) -> None:
        name = edit.names[0]
        widen_sequence(pm, edit, insert_source(pm, name, modules[name]))

    def describe(self, edit: SequenceEdit) -> str:
        inputs = ", ".join(f"{ph.target} ({kind})" for ph, _, kind in edit.inputs)
        return (f"graph-level: {edit.n} virtual token(s) after {edit.site.key} (role embed); sequence inputs "
                f"widened: {inputs or 'none'}")


class VirtualSource(AdapterModule):
    """A module called with no inputs whose output (virtual tokens, K/V prefixes) does not depend on the
    model's inputs; :func:`peftfx.fold` replaces its node by the value."""

    input_independent: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False


def record_site(key: str, module_type: str, layer: int | None = None) -> dict[str, Any]:
    """The ``AdapterRecord.site`` description of a graph-level module (same fields as ``Site.describe``)."""
    return {"key": key, "path": key, "layer": layer, "module_type": module_type, "op": "graph",
            "kind": "virtual", "weight": None, "weight_shape": [], "bias": None, "roles": [], "slices": {}}


def insert_source(pm, name: str, module: nn.Module) -> fx.Node:
    """Register ``module`` under ``name`` and call it (no inputs) right after the last placeholder."""
    pm.add_submodule(name, module)
    last = [n for n in pm.graph.nodes if n.op == "placeholder"][-1]
    with pm.graph.inserting_after(last):
        node = pm.graph.call_module(name, ())
    node.meta["peftfx"] = {"path": name, "layer": None, "module_type": type(module).__name__, "adapter": name}
    return node


# ------------------------------------------------------------------------------- runtime helpers
# Plain functions called from the graph (``call_function``); they are ordinary torch code, so the graph stays
# trainable and ``torch.export`` traces through them.
def widen_input(x: torch.Tensor, n: int, dim: int, kind: str) -> torch.Tensor:
    """Prepend ``n`` entries to ``x`` along ``dim``: a constant per kind, or (``positions``) 0…n-1 followed by
    the given positions shifted by ``n``."""
    shape = list(x.shape)
    shape[dim] = n
    if kind == "positions":
        view = [n if i == dim else 1 for i in range(x.dim())]
        head = torch.arange(n, device=x.device, dtype=x.dtype).view(view).expand(shape)
        return torch.cat([head, x + n], dim)
    return torch.cat([x.new_full(shape, _FILL[kind]), x], dim)


def prepend_virtual(emb: torch.Tensor, virtual: torch.Tensor, n: int) -> torch.Tensor:
    """``emb`` [B, n+S, D] (first n rows: placeholders) → virtual tokens [n, D] followed by the S real rows."""
    v = virtual.to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
    return torch.cat([v, emb[:, n:]], 1)


# ------------------------------------------------------------------------------- sequence widening
@dataclass
class SequenceEdit:
    """What widening the token sequence by ``n`` changes (found by :func:`plan_sequence`)."""

    site: Any                                   # the token-embedding Site
    n: int
    inputs: list[tuple[fx.Node, int, str]]      # (placeholder, sequence dim, kind)
    outputs: dict[int, int] = field(default_factory=dict)       # output value (ordinal) → its sequence dim
    names: list[str] = field(default_factory=list)              # modules built for this edit


def _expr(d: Any):
    return d.node.expr if isinstance(d, torch.SymInt) else None




def token_embedding(pm, plan, rule, index: int):
    """The token-embedding site the rule selects (the first in graph order), or a SiteError naming what is
    missing."""
    sites = [s for s in plan.sites if s.kind == "embedding" and "embed" in s.roles and rule.selector.matches(s)]
    if not sites:
        found = sorted({r for s in plan.sites if s.kind == "embedding" for r in s.roles}) or ["none"]
        raise SiteError(
            f"rule {index} ({rule.name}) needs the model's token embedding — an embedding lookup fed by integer "
            f"token ids (role 'embed') — and {type(pm).__name__} has none that its targets select "
            f"(embedding roles found: {', '.join(found)}). Virtual tokens are prepended at the token-embedding "
            "output, so the model must take token ids (e.g. input_ids), not pixels or precomputed embeddings.")
    if len(sites) > 1:
        log.info("%s: %d token embeddings selected (%s); virtual tokens go before the first (an "
                 "encoder-decoder's encoder)", rule.name, len(sites), ", ".join(s.key for s in sites))
    return sites[0]


def plan_sequence(pm, plan, rule, index: int, n: int) -> SequenceEdit:
    """Check that the sequence can be widened at the selected token embedding and record what changes."""
    site = token_embedding(pm, plan, rule, index)
    ids, out = _val(site.input), _val(site.node)
    seq = _expr(ids.shape[-1]) if ids is not None and ids.dim() >= 1 else None
    if seq is None:
        raise SiteError(f"rule {index} ({rule.name}) needs a dynamic sequence dimension, but the token ids of "
                        f"{site.key} have a fixed shape {None if ids is None else tuple(ids.shape)}. Trace with "
                        "dynamic=True (the default) so the graph can run on N more positions.")
    if out is None or out.dim() != 3 or _expr(out.shape[1]) != seq or _expr(out.shape[0]) == seq:
        raise SiteError(f"rule {index} ({rule.name}): the token embedding {site.key} returns shape "
                        f"{None if out is None else tuple(out.shape)}; virtual tokens need [batch, sequence, "
                        "hidden] with distinct batch and sequence sizes (use an example batch ≠ sequence length).")
    feeding = _ancestors(site.input)
    inputs = [_input_kind(ph, seq, ph in feeding, index, rule.name) for ph in pm.graph.nodes
              if ph.op == "placeholder" and _seq_dims(ph, seq)]
    inputs += _loose_labels(pm, plan, {ph for ph, _, _ in inputs})
    kept = _cache_leaves(pm.graph)           # a KV cache returned holds the virtual tokens' keys: never sliced
    outputs = {i: dims[0] for i, node in enumerate(_output_values(pm.graph))
               if i not in kept and (dims := _seq_dims(node, seq))}
    return SequenceEdit(site=site, n=n, inputs=inputs, outputs=outputs)


def _output_values(graph: fx.Graph) -> list[fx.Node]:
    """The graph's output nodes in a fixed order (adapters spliced later replace nodes, not positions)."""
    found: list[fx.Node] = []
    fx.node.map_arg(next(o for o in graph.nodes if o.op == "output").args, found.append)
    return found


def _cache_leaves(graph: fx.Graph) -> set[int]:
    """Ordinals of the output values that lie inside a cache object (a pytree node whose class name ends in
    ``Cache``, as transformers' ``DynamicCache``) in the graph's output structure."""
    spec = getattr(getattr(graph._codegen, "pytree_info", None), "out_spec", None)
    found: set[int] = set()
    if spec is None:
        return found

    def walk(sp, start: int, inside: bool) -> int:
        inside = inside or (isinstance(sp.type, type) and sp.type.__name__.endswith("Cache"))
        if sp.num_children == 0 and sp.num_leaves == 1:
            if inside:
                found.add(start)
            return start + 1
        for child in sp.children_specs:
            start = walk(child, start, inside)
        return start

    walk(spec, 0, False)
    return found


def _seq_dims(node: fx.Node, seq) -> list[int]:
    v = _val(node)
    return [] if v is None else [i for i, d in enumerate(v.shape) if _expr(d) == seq]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """Nodes whose tensor values flow into ``node`` (symbolic sizes read off a tensor do not count)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(a for a in n.all_input_nodes if _val(a) is not None or a.op == "get_attr")
    return seen


def _input_kind(ph: fx.Node, seq, feeds_embedding: bool, index: int, method: str) -> tuple[fx.Node, int, str]:
    dims, v, name = _seq_dims(ph, seq), _val(ph), str(ph.target)
    if len(dims) != 1:
        raise SiteError(f"rule {index} ({method}): input '{name}' {tuple(v.shape)} has the sequence length in "
                        f"{len(dims)} dimensions; only inputs with one sequence dimension (a 2-D attention mask) "
                        "can be extended by the virtual tokens. Pass a 2-D mask instead.")
    shape_only = all(u.target is torch.ops.aten.sym_size.int for u in ph.users)
    if "mask" in name:
        kind = "mask"
    elif name.endswith("labels"):
        if feeds_embedding:
            raise SiteError(f"rule {index} ({method}): input '{name}' feeds the token embedding — the example "
                            f"'{name}' was the same tensor as the token ids, so torch.export traced one input for "
                            f"both. Pass a copy (e.g. {name}=input_ids.clone()) in example_inputs.")
        kind = "labels"
    elif name == "token_type_ids":
        kind = "zeros"
    elif name == "position_ids" and not v.is_floating_point():
        kind = "positions"
    elif (feeds_embedding or shape_only) and not v.is_floating_point():
        kind = "ids"                      # the token ids (or an input read only for its shape)
    else:
        raise SiteError(f"rule {index} ({method}): input '{name}' {tuple(v.shape)} runs along the token "
                        "sequence and peftfx does not know how to extend it by the virtual tokens (it knows "
                        "token ids, *mask*, *labels, token_type_ids and position_ids). Leave it out of "
                        "example_inputs or rename it.")
    return ph, dims[0], kind


def _loose_labels(pm, plan, taken: set[fx.Node]) -> list[tuple[fx.Node, int, str]]:
    """Causal-LM labels [batch, sequence] that torch.export gave their own size symbol (only the loss relates
    them to the logits): 2-D integer ``*labels`` inputs that reach no embedding lookup (a seq2seq model's labels
    feed its decoder and are left alone)."""
    feeding: set[fx.Node] = set()
    for s in plan.sites:
        if s.kind == "embedding":
            feeding |= _ancestors(s.input)
    return [(ph, 1, "labels") for ph in pm.graph.nodes
            if ph.op == "placeholder" and ph not in taken and str(ph.target).endswith("labels")
            and (v := _val(ph)) is not None and v.dim() == 2 and not v.is_floating_point() and ph not in feeding]


def widen_sequence(pm, edit: SequenceEdit, source: fx.Node) -> None:
    """Apply ``edit``: widen the inputs, put the source's virtual tokens at the front of the token
    embedding's output, slice the outputs back to the real positions."""
    g, n = pm.graph, edit.n
    last = [p for p in g.nodes if p.op == "placeholder"][-1]
    for ph, dim, kind in edit.inputs:
        with g.inserting_after(last):
            wide = g.call_function(widen_input, (ph, n, dim, kind))
        wide.meta = {"val": ph.meta.get("val"), "peftfx": {"path": "", "layer": None, "module_type": ""}}
        ph.replace_all_uses_with(wide, delete_user_cb=lambda u, w=wide: u is not w)
    end = chain_end(edit.site.node)
    with g.inserting_after(end):
        tokens = g.call_function(prepend_virtual, (end, source, n))
    tokens.meta = {"val": end.meta.get("val"), "peftfx": dict(end.meta.get("peftfx", {}))}
    end.replace_all_uses_with(tokens, delete_user_cb=lambda u: u is not tokens)
    output = next(o for o in g.nodes if o.op == "output")
    values, sliced = _output_values(g), {}
    for i, dim in edit.outputs.items():
        node = values[i]
        if node not in sliced:
            with g.inserting_before(output):
                sliced[node] = g.call_function(torch.ops.aten.slice.Tensor, (node, dim, n, _INT_MAX))
            sliced[node].meta = {"val": node.meta.get("val"), "peftfx": {"path": "", "layer": None, "module_type": ""}}
    output.args = fx.node.map_arg(output.args, lambda a: sliced.get(a, a))
