"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

    y = W₀x + b + s · B A dropout(x),   A ∈ ℝ^{r×in}, B ∈ ℝ^{out×r},  s = α/r  (rsLoRA: s = α/√r, Kalajdzievski 2023)

A starts Kaiming-uniform (a=√5) and B at zero ("kaiming"), or A ~ N(0, 1/r) ("gaussian"), so an untrained
LoRA is the identity. On an embedding the roles flip as in Hugging Face PEFT: A ∈ ℝ^{r×vocab} starts at zero,
B ∈ ℝ^{dim×r} Gaussian, and the update is s · embedding(ids, Aᵀ) Bᵀ. Merging adds s·BA to the ``[out, in]``
view of the weight; unmerging subtracts it.

On a convolution (``nn.Conv1d/2d/3d``, site kind ``conv``) the pair is Hugging Face PEFT's: A is a convolution
like the site's (its kernel, stride, padding and dilation; groups 1) from the input channels to r channels, B a
1×…×1 convolution from r channels to the output channels (groups as the site's), and y = W₀ ⊛ x + b + s·B ⊛ A ⊛ x.
Merging adds ΔW[o, i, κ] = s Σ_j B[o, j] A[j, i, κ] (exactly B ⊛ A, as HF folds it). A grouped convolution
(groups g > 1, rank a multiple of g) trains and saves as in HF PEFT but cannot merge (B ⊛ A is dense across
groups, the weight is not): it stays in the graph. Unlike HF PEFT, A keeps the site's dilation (HF's A drops it,
so its output no longer lines up with the base's).

``nn.MultiheadAttention`` is two linear sites, its in-projection ``mha`` (``in_proj_weight`` [3E, E], one pair for
all of q/k/v by default, or per selected slice with ``fused="split"``) and ``mha.out_proj``: targeting both gives
Hugging Face PEFT's MultiheadAttention LoRA (same pairs, counts and W + ΔW; HF applies no LoRA dropout there, since
it merges before each forward, while ``dropout`` here acts on the projections' input as on any linear).

A fused projection (GPT-2's ``c_attn``, Phi3's ``qkv_proj`` and ``gate_up_proj``, GPT-NeoX/BLOOM's per-head
interleaved ``query_key_value``) takes one pair for the whole weight (``fused="joint"``, as HF PEFT) or, with
``fused="split"``, one pair per selected slice (roles ``attn.q/k/v``, ``mlp.gate/up``; ``site.slices``), laid out
block-wise so that the update is still one low-rank product B_full A_full whose rows outside the selected slices are
zero: slice i (rows ρ_i, a range or an index set) adds s·B_i A_i to W[ρ_i], rank·(in + |ρ_i|) parameters. When a
selected slice's rows could not be located, the rule takes one pair for the whole projection (and logs why).

Mixture-of-experts weights (site kind ``experts``, 3-D ``[E, out, in]``) take one pair per expert in Hugging Face
PEFT's ``target_parameters`` form (see :mod:`.experts`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import RuleError
from ..rules import Selector, select
from ..sites import slice_ranges
from .base import AdapterModule, MethodConfig, register_method
from .experts import decline_experts_lora, lora_experts

log = logging.getLogger(__name__)

__all__ = ["LoRA", "LoRALinear", "LoRAEmbedding", "LoRAConv"]

#: roles that may own a slice of a fused projection (``Site.slices``)
_SLICED = ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up")


@register_method
@dataclass(frozen=True)
class LoRA(MethodConfig):
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Selector | None = None
    rslora: bool = False
    init: str = "kaiming"          # "kaiming" | "gaussian"
    fused: str = "joint"           # "joint" | "split"

    name: ClassVar[str] = "lora"
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "linear_t", "embedding", "conv", "experts"})
    composes: ClassVar[bool] = True

    def validate(self) -> None:
        self.require_positive_int("rank")
        self.require_fraction("dropout")
        if self.init not in ("kaiming", "gaussian"):
            raise RuleError(f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.fused not in ("joint", "split"):
            raise RuleError(f"LoRA fused must be 'joint' or 'split', got {self.fused!r}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)

    def default_targets(self) -> Selector:
        return select.role("attn.q") | select.role("attn.v")

    def decline(self, site) -> str | None:
        if site.kind == "experts":
            return decline_experts_lora(self, site)
        if site.kind == "conv" and self.rank % site.conv.groups:
            return (f"a grouped convolution (groups={site.conv.groups}) takes LoRA only with a rank that is a "
                    f"multiple of its groups (B is grouped as the weight is, as in HF PEFT); rank is {self.rank}")
        return None

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> AdapterModule:
        kw = dict(device=weight.device, dtype=weight.dtype)
        if site.kind == "experts":
            return lora_experts(self, site, weight)
        if site.kind == "conv":
            return LoRAConv(site.conv, site.in_features, site.out_features, tuple(site.weight_shape[2:]), self.rank,
                            self.scaling, self.dropout, self.init, **kw)
        if site.kind == "embedding":
            return LoRAEmbedding(site.in_features, site.out_features, self.rank, self.scaling, **kw)
        spans = [(0, site.out_features)]
        if self.fused == "split" and (site.slices or "attn.qkv" in site.roles):
            chosen = [r for r in _SLICED if r in roles and r in site.roles]
            missing = [r for r in chosen if r not in site.slices]
            if chosen and not missing:
                spans = sorted((site.slices[r] for r in chosen), key=lambda sp: slice_ranges(sp)[0])
            elif chosen:
                log.warning("LoRA fused='split': the rows of %s in %s could not be located; it takes one pair for "
                            "the whole projection", ", ".join(missing), site.key)
        return LoRALinear(site.in_features, site.out_features, self.rank, self.scaling, self.dropout,
                          self.init, spans, **kw)


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """s = α / r, or α / √r with rsLoRA (Kalajdzievski 2023); shared by LoRA-family methods (DoRA)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def init_lora_A(a: nn.Parameter, init: str, rank: int) -> None:
    """LoRA's A at init, as HF PEFT: ``"gaussian"`` N(0, 1/r), else Kaiming-uniform (a = √5); B stays zero.
    Tensors on the meta device have no values to fill."""
    if a.device.type == "meta":
        return
    if init == "gaussian":
        nn.init.normal_(a, std=1.0 / rank)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class LoRALinear(AdapterModule):
    """``forward(x, y) = y + s · (dropout(x) Aᵀ) B_fullᵀ``; ``B_full`` places each slice's B in its rows."""

    mergeable: ClassVar[bool] = True

    def __init__(self, in_features, out_features, rank, scaling, dropout, init, spans, device=None, dtype=None):
        super().__init__()
        n = len(spans)
        self.scaling = scaling
        self.out_features = out_features
        # one slice each: (start, end), or a tuple of ranges (rows interleaved per head)
        self.spans = [tuple(s) if isinstance(s[0], int) else tuple(tuple(r) for r in s) for s in spans]
        rows = [torch.cat([torch.arange(a, b) for a, b in slice_ranges(sp)]) for sp in self.spans]
        self.lora_A = nn.Parameter(torch.empty(rank * n, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(sum(len(r) for r in rows), rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_lora_A(self.lora_A, init, rank)
        # rows and columns of B_full that the rows of lora_B fill (slice i: its rows × columns i·r…(i+1)·r)
        self._whole = self.spans == [(0, out_features)]
        self._fill = None if self._whole else (torch.cat(rows), torch.cat([torch.full((len(r),), i) for i, r
                                                                           in enumerate(rows)]))

    def full_B(self) -> torch.Tensor:
        """B as ``[out, rank·n]``: slice i's rows hold B_i in columns i·r…(i+1)·r, zeros elsewhere."""
        if self._whole:
            return self.lora_B
        r = self.lora_B.shape[1]
        rows, which = (t.to(self.lora_B.device) for t in self._fill)
        cols = which[:, None] * r + torch.arange(r, device=rows.device)[None, :]
        full = self.lora_B.new_zeros(self.out_features, r * len(self.spans))
        return full.index_put((rows[:, None], cols), self.lora_B)

    def delta(self) -> torch.Tensor:
        return (self.full_B() @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.lora_A)
        if y.dim() >= 2 and y.is_contiguous() and y.dtype == h.dtype:
            # one GEMM that also scales and adds: y + s·h Bᵀ (saves two elementwise passes over y)
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.full_B().t(),
                              alpha=self.scaling)
            return out.view(y.shape)
        return y + F.linear(h, self.full_B()) * self.scaling


class LoRAEmbedding(AdapterModule):
    """``forward(ids, y) = y + s · embedding(ids, Aᵀ) Bᵀ``."""

    mergeable: ClassVar[bool] = True

    def __init__(self, num_embeddings, embedding_dim, rank, scaling, device=None, dtype=None):
        super().__init__()
        self.scaling = scaling
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, rank, device=device, dtype=dtype))
        if self.lora_embedding_B.device.type != "meta":
            nn.init.normal_(self.lora_embedding_B)

    def delta(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A) * self.scaling

    def forward(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.embedding(ids, self.lora_embedding_A.t())
        return y + (h @ self.lora_embedding_B.t()) * self.scaling


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAConv(AdapterModule):
    """``forward(x, y) = y + s · B ⊛ (A ⊛ dropout(x))``: ``lora_A`` ``[r, in, *kernel]`` slides like the site's
    weight (stride, padding, dilation); ``lora_B`` ``[out, r/groups, 1, …]`` mixes channels (grouped as the site).
    Both are stored in Hugging Face PEFT's shapes (its ``lora_A.weight``/``lora_B.weight`` of the two convs)."""

    def __init__(self, spec, in_channels, out_channels, kernel, rank, scaling, dropout, init, device=None,
                 dtype=None):
        super().__init__()
        self.scaling = scaling
        self.spec = spec
        self.mergeable = spec.groups == 1      # B ⊛ A is dense across channel groups: a grouped weight cannot hold it
        self.lora_A = nn.Parameter(torch.empty(rank, in_channels, *kernel, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_channels, rank // spec.groups, *([1] * spec.dims), device=device,
                                               dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_lora_A(self.lora_A, init, rank)

    def delta(self) -> torch.Tensor:
        """ΔW = s · B ⊛ A as ``[out, in, *kernel]``: ΔW[o, i, κ] = s Σ_j B[o, j] A[j, i, κ] (groups 1)."""
        if not self.mergeable:
            raise NotImplementedError(f"LoRA on a grouped convolution (groups={self.spec.groups}) cannot be merged")
        a = self.lora_A
        return (self.lora_B.flatten(1) @ a.flatten(1)).view(self.lora_B.shape[0], *a.shape[1:]) * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        conv, sp = _CONV[self.spec.dims], self.spec
        padding = sp.padding if isinstance(sp.padding, str) else list(sp.padding)
        h = conv(self.dropout(x), self.lora_A, None, list(sp.stride), padding, list(sp.dilation), 1)
        return y + conv(h, self.lora_B, None, 1, 0, 1, sp.groups) * self.scaling
