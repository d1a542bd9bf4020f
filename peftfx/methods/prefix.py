"""Prefix tuning — Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv:2101.00190).

At every attention op ℓ, N trainable key and value rows are put before the keys and values of the S real tokens:

    K'ℓ = [Pᵏℓ; Kℓ],  V'ℓ = [Pᵛℓ; Vℓ],   attnℓ = softmax(Q K'ℓᵀ / √d + M') V'ℓ

P = E_p ∈ ℝ^{N × L·2·Dkv} (Dkv = kv heads × head dim), or with ``projection=True`` the reparameterisation of
the paper, P = W₂ tanh(W₁ E_p + b₁) + b₂ with E_p ∈ ℝ^{N × token_dim} and hidden size ``encoder_hidden_size``.
The layout (layer ℓ's keys at row block 2ℓ, values at 2ℓ+1, each [N, kv heads, head dim]) and the parameter
count are Hugging Face PEFT's ``PrefixEncoder``. Nothing in P depends on the inputs: :func:`peftfx.fold` turns
the MLP's output into constants, so inference runs no encoder.

Graph rewrite, per attention op found by :func:`peftfx.roles.attention_nodes` (``scaled_dot_product_attention``
or eager matmul → softmax → matmul): the prefix is concatenated to the key and value operands; a mask gets N
leading "attend" columns (True / 0.0), so every real query sees the whole prefix and padding still hides pad
keys; ``is_causal=True`` becomes the explicit mask key j ≤ query i + N (SDPA's own causal mask would align a
longer key top-left and hide the prefix). Grouped-query attention: the prefix has the kv heads; where the graph
repeats K/V (``repeat_kv``: an expand over a new head axis before the attention op) the prefix is repeated the
same way, which equals concatenating before the repeat. Where no repeat is found the prefix has as many heads as
the attention's K.

Positions (``position_offset=True``, the default): the prefix occupies positions 0…N-1, so real tokens take
positions N…N+S-1 — the paper's formulation and Hugging Face PEFT's behaviour (its prefix is a KV cache of
length N). The rewrite finds the position ids (``arange`` nodes, position buffers holding 0,1,2,…, or a
``position_ids`` input) and adds N where they index a position-embedding table (GPT-2, BERT) or feed the
queries and keys (rotary: Llama); mask computations are left alone. ``position_offset=False`` keeps the base
model's positions 0…S-1 for the real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from .._errors import SiteError
from .._util import tensor_val as _val
from ._positions import offset_positions, plan_positions
from ..model import adapter_name
from ._virtual import VirtualMethod, VirtualSource, insert_source, record_site
from ..roles import attention_nodes
from ..rules import Selector, select
from .base import register_method

__all__ = ["PrefixTuning", "PrefixEncoder"]

aten = torch.ops.aten
_BATCH_MM = {aten.matmul.default, aten.bmm.default}
_REPEAT_WALK = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.clone.default,
                aten.contiguous.default, aten.transpose.int, aten.permute.default, aten.alias.default}


@register_method
@dataclass(frozen=True)
class PrefixTuning(VirtualMethod):
    """Prefix-tuning rule: N key/value prefixes per attention op (``targets``: the layers, by any selector of
    their sites; None = every attention op)."""

    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int | None = None
    token_dim: int | None = None
    position_offset: bool = True
    targets: Selector | None = None

    name: ClassVar[str] = "prefix"

    def validate(self) -> None:
        self.require_positive_int("num_virtual_tokens")
        self.require_positive_int("encoder_hidden_size", "token_dim", optional=True)

    def default_targets(self) -> Selector:
        return select.role("attn.k")

    def prepare(self, pm, plan, index: int) -> "PrefixEdit":
        self.check_single(plan, index)
        found = attention_nodes(pm.graph)
        if not found:
            raise SiteError(
                f"rule {index} (prefix) needs the model's attention ops — scaled_dot_product_attention, or the "
                f"eager pattern matmul(q, kᵀ) → softmax → matmul(·, v) — and the graph of {type(pm).__name__} has "
                "none (eager attention that adds a mask between the matmul and the softmax is not recognised; "
                "load Hugging Face models with attn_implementation='sdpa').")
        atts = [_attention_spec(a, index) for a in found]
        atts = self._selected(atts, plan, index)
        shapes = {(a.heads // a.n_rep, a.head_dim) for a in atts}
        if len(shapes) > 1:
            raise SiteError(f"rule {index} (prefix): the selected attention ops have different (kv heads, head "
                            f"dim) {sorted(shapes)}; one prefix table needs one layout. Select layers of one shape "
                            "with targets=select.layer(...).")
        heads_kv, head_dim = shapes.pop()
        edit = PrefixEdit(atts, heads_kv, head_dim)
        if self.position_offset:
            edit.absolute, edit.rotary = _plan_positions(pm, plan, found, atts, index)
        return edit

    def _selected(self, atts: list["AttentionSpec"], plan, index: int) -> list["AttentionSpec"]:
        if self.targets is None:
            return atts
        layers = {s.layer for s in plan.sites if self.targets.matches(s) and s.layer is not None}
        chosen = [a for a in atts if a.layer in layers]
        if not chosen:
            raise SiteError(f"rule {index} (prefix): targets {self.targets.to_dict()} select sites in layers "
                            f"{sorted(layers)}, but the attention ops are in layers "
                            f"{sorted({a.layer for a in atts if a.layer is not None})}.")
        return chosen

    def build_graph(self, pm, edit: "PrefixEdit") -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        ref = next(iter(pm.parameters()))
        dkv = edit.heads_kv * edit.head_dim
        module = PrefixEncoder(len(edit.attentions), self.num_virtual_tokens, dkv, self.projection,
                               self.token_dim or dkv, self.encoder_hidden_size or self.token_dim or dkv,
                               device=ref.device, dtype=ref.dtype)
        name = adapter_name(pm, "", self.name)
        while hasattr(pm, name):
            name = "peftfx_" + name
        edit.names = [name]
        return {name: (module, record_site(name, type(module).__name__))}

    def rewrite(self, pm, edit: "PrefixEdit", modules: dict[str, nn.Module]) -> None:
        g, n = pm.graph, self.num_virtual_tokens
        source = insert_source(pm, edit.names[0], modules[edit.names[0]])
        padded: dict[fx.Node, fx.Node] = {}         # one extended mask per mask node (layers share masks)
        for layer, a in enumerate(edit.attentions):
            with g.inserting_before(a.node):
                pk = g.call_function(prefix_kv, (source, layer, edit.heads_kv, edit.head_dim, 0))
                pv = g.call_function(prefix_kv, (source, layer, edit.heads_kv, edit.head_dim, 1))
            _rewrite_attention(g, a, pk, pv, n, padded)
        offset_positions(g, edit.absolute, edit.rotary, n)

    def describe(self, edit: "PrefixEdit") -> str:
        layers = sorted({a.layer for a in edit.attentions if a.layer is not None})
        span = f"layers {layers[0]}–{layers[-1]}" if layers else "no layer index"
        return (f"graph-level: {self.num_virtual_tokens} key/value prefix row(s) at {len(edit.attentions)} attention "
                f"op(s) ({span}; {edit.heads_kv} kv head(s) × {edit.head_dim})")


@dataclass
class AttentionSpec:
    node: fx.Node                 # the SDPA node, or the eager scores matmul q @ kᵀ
    q: fx.Node
    k: fx.Node                    # SDPA: k [B, H, S, d]; eager: kᵀ [B, H, d, S]
    v: fx.Node
    heads: int                    # heads of K as the attention op reads it (after any repeat)
    n_rep: int                    # how often each kv head is repeated before the op
    head_dim: int
    layer: int | None
    value_mm: fx.Node | None = None      # eager: probs @ v
    mask: fx.Node | None = None          # SDPA attn_mask
    pad_mask: bool = False               # the mask has a key dimension to extend
    causal: bool = False                 # SDPA is_causal=True without a mask


@dataclass
class PrefixEdit:
    attentions: list[AttentionSpec]
    heads_kv: int
    head_dim: int
    absolute: list[Any] = field(default_factory=list)                      # position-embedding sites
    rotary: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)    # (position node, its user) edges
    names: list[str] = field(default_factory=list)




def _attention_spec(found: tuple, index: int) -> AttentionSpec:
    node = found[0]
    layer = node.meta.get("peftfx", {}).get("layer")
    eager = node.target is not aten.scaled_dot_product_attention.default
    if eager:
        softmax, _, kt, v, value_mm = found
        node = _scores(softmax)
        if _joins_between(node, softmax):
            raise SiteError(f"rule {index} (prefix): attention op {node.name} (layer {layer}) adds a mask or bias "
                            "between q·kᵀ and the softmax (eager attention); prefix tuning extends keys at "
                            "scaled_dot_product_attention or at a plain matmul → softmax → matmul. Load Hugging "
                            "Face models with attn_implementation='sdpa'.")
        if node.target is aten.baddbmm.default:
            raise SiteError(f"rule {index} (prefix): attention op {node.name} (layer {layer}) adds a bias inside "
                            "baddbmm(bias, q, kᵀ) (e.g. BLOOM's ALiBi); prefix tuning cannot extend that bias to "
                            "the prefix keys. Use LoRA or IA3 on this model, or prompt tuning.")
        q, kt = node.args[0], node.args[1]
        kv, vv = _val(kt), _val(v)
        ok = kv is not None and vv is not None and kv.dim() == 4 and vv.dim() == 4 and kv.shape[-2] == vv.shape[-1]
        spec = AttentionSpec(node, q, kt, v, kv.shape[1] if ok else 0, _repeat_factor(kt) if ok else 1,
                             kv.shape[-2] if ok else 0, layer, value_mm=value_mm)
    else:
        q, k, v = node.args[:3]
        kv, vv = _val(k), _val(v)
        ok = kv is not None and vv is not None and kv.dim() == 4 and vv.dim() == 4 and kv.shape[-1] == vv.shape[-1]
        gqa = bool(node.kwargs.get("enable_gqa", False))
        spec = AttentionSpec(node, q, k, v, kv.shape[1] if ok else 0, 1 if gqa or not ok else _repeat_factor(k),
                             kv.shape[-1] if ok else 0, layer)
        spec.mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        spec.causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
        mv = _val(spec.mask)
        spec.pad_mask = mv is not None and not (isinstance(mv.shape[-1], int) and mv.shape[-1] == 1)
    if not ok or not isinstance(spec.heads, int) or not isinstance(spec.head_dim, int) or spec.heads % spec.n_rep:
        raise SiteError(f"rule {index} (prefix): attention op {node.name} (layer {layer}) does not read keys and "
                        "values as [batch, heads, sequence, head dim] with static heads and equal key/value head "
                        f"dims; prefix tuning cannot shape a prefix for it.\n  at node: {node.format_node()}")
    return spec


def _joins_between(scores: fx.Node, softmax: fx.Node) -> bool:
    """Whether another tensor joins the path scores → softmax (an additive mask the prefix would not cover)."""
    node = softmax.args[0]
    while node is not scores:
        tensors = [a for a in node.all_input_nodes if _val(a) is not None]
        if len(tensors) != 1:
            return True
        node = tensors[0]
    return False


def _scores(softmax: fx.Node) -> fx.Node:
    node = softmax.args[0]
    while node.target not in _BATCH_MM and node.target is not aten.baddbmm.default:
        node = next(a for a in node.all_input_nodes if _val(a) is not None)
    return node


def _repeat_factor(k: fx.Node) -> int:
    """n_rep of a ``repeat_kv`` (expand [B, kv, 1, S, d] → [B, kv, n_rep, S, d], then reshape) behind ``k``."""
    node = k
    for _ in range(8):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return 1
        if node.target is aten.expand.default:
            src, out = _val(node.args[0]), _val(node)
            if src is not None and out is not None and src.dim() == 5 and src.shape[2] == 1 \
                    and isinstance(out.shape[2], int):
                return int(out.shape[2])
            return 1
        if node.target not in _REPEAT_WALK:
            return 1
        node = node.args[0]
    return 1


def _rewrite_attention(g: fx.Graph, a: AttentionSpec, pk: fx.Node, pv: fx.Node, n: int,
                       padded: dict[fx.Node, fx.Node]) -> None:
    node = a.node
    with g.inserting_before(node):
        k2 = g.call_function(prepend_keys_t if a.value_mm is not None else prepend_kv, (node.args[1], pk, a.n_rep))
    if a.value_mm is not None:                      # eager: scores = q @ kᵀ, out = probs @ v
        node.args = (node.args[0], k2) + tuple(node.args[2:])
        with g.inserting_before(a.value_mm):
            v2 = g.call_function(prepend_kv, (a.value_mm.args[1], pv, a.n_rep))
        a.value_mm.args = (a.value_mm.args[0], v2) + tuple(a.value_mm.args[2:])
        return
    with g.inserting_before(node):
        v2 = g.call_function(prepend_kv, (node.args[2], pv, a.n_rep))
        mask = None
        if a.pad_mask and a.mask not in padded:
            with g.inserting_after(a.mask):
                padded[a.mask] = g.call_function(pad_mask, (a.mask, n))
        if a.pad_mask:
            mask = padded[a.mask]
        elif a.causal:
            mask = g.call_function(causal_prefix_mask, (node.args[0], k2))
    args, kwargs = list(node.args), dict(node.kwargs)
    args[1], args[2] = k2, v2
    if mask is not None:
        if len(args) > 3:
            args[3] = mask
        else:
            kwargs["attn_mask"] = mask
    if a.causal:
        if len(args) > 5:
            args[5] = False
        else:
            kwargs["is_causal"] = False
    node.args, node.kwargs = tuple(args), kwargs


def _plan_positions(pm, plan, found, atts: list[AttentionSpec], index: int):
    blocked = {f[0] for f in found} | {a.node for a in atts} | {a.value_mm for a in atts if a.value_mm is not None}
    return plan_positions(pm, plan.sites, blocked, {a.q for a in atts} | {a.k for a in atts},
                          {a.mask for a in atts if isinstance(a.mask, fx.Node)})


# ------------------------------------------------------------------------------- runtime helpers
def prefix_kv(table: torch.Tensor, layer: int, heads: int, head_dim: int, which: int) -> torch.Tensor:
    """Layer ``layer``'s keys (``which=0``) or values (1) from the [N, L·2·heads·head_dim] table → [heads, N, d]."""
    n = table.shape[0]
    return table.view(n, -1, heads, head_dim)[:, 2 * layer + which].transpose(0, 1)


def prepend_kv(x: torch.Tensor, prefix: torch.Tensor, n_rep: int) -> torch.Tensor:
    """x [B, H, S, d], prefix [H/n_rep, N, d] → [B, H, N+S, d]; each prefix head repeated n_rep times."""
    b = x.shape[0]
    h, n, d = prefix.shape
    p = prefix.to(x.dtype)[None, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)
    return torch.cat([p, x], -2)


def prepend_keys_t(xt: torch.Tensor, prefix: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Transposed keys xt [B, H, d, S] → [B, H, d, N+S]."""
    return prepend_kv(xt.transpose(-1, -2), prefix, n_rep).transpose(-1, -2)


def pad_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """N leading key columns that attend: True for a boolean mask, 0 for an additive one."""
    shape = list(mask.shape)
    shape[-1] = n
    pad = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat([pad, mask], -1)


def causal_prefix_mask(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean [L, S'] mask with key j visible to query i iff j ≤ i + (S' - L): causal, prefix always visible."""
    length, keys = q.shape[-2], k.shape[-2]
    return torch.ones(length, keys, dtype=torch.bool, device=q.device).tril(keys - length)


class PrefixEncoder(VirtualSource):
    """``forward() = P`` ∈ ℝ^{N×L·2·Dkv}: the table ``prefix_embedding``, or ``prefix_mlp`` over it."""

    def __init__(self, layers: int, num_virtual_tokens: int, dkv: int, projection: bool = False,
                 token_dim: int | None = None, hidden: int | None = None, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        width = layers * 2 * dkv
        token_dim = token_dim or dkv
        self.prefix_embedding = nn.Parameter(torch.empty(num_virtual_tokens, token_dim if projection else width,
                                                         **kw))
        if self.prefix_embedding.device.type != "meta":
            nn.init.normal_(self.prefix_embedding)
        self.prefix_mlp = nn.Sequential(nn.Linear(token_dim, hidden or token_dim, **kw), nn.Tanh(),
                                        nn.Linear(hidden or token_dim, width, **kw)) if projection else None

    def forward(self) -> torch.Tensor:
        if self.prefix_mlp is None:
            return self.prefix_embedding
        return self.prefix_mlp(self.prefix_embedding)
