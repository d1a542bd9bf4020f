"""DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353).

The weight is split into a magnitude and a direction, and LoRA adapts the direction:

    W' = m ⊙ (W₀ + sBA) / ‖W₀ + sBA‖,    y = W'x + b,    s = α/r  (rsLoRA: s = α/√r)

with ‖·‖ the L2 norm of each output row of the ``[out, in]`` weight (the paper's "column-wise" norm of its
``[in, out]`` layout; Hugging Face PEFT's ``linalg.norm(W, dim=1)``), and m ∈ ℝ^out trained, initialised to
‖W₀‖ so an untrained DoRA is the identity (B starts at zero). As the paper suggests (§4.3) and as Hugging
Face PEFT does, the norm is treated as a constant in the backward pass (detached), so no gradient flows
through it. The adapter reads the base output y and adds

    y' = y + (m/‖W₀+sBA‖ − 1) ⊙ (y − b) + m/‖W₀+sBA‖ ⊙ s·B A x

which needs the base weight (for the norm) and the bias: the module declares ``reads_weight`` and is
called ``m(x, y, w, b)``. With dropout active (training, p > 0) the base term is recomputed on the dropped
input, W₀·dropout(x), as Hugging Face PEFT does. Merging writes W' into the weight and keeps the norm
used, so unmerging (W₀ = W'·‖W₀+sBA‖/m − sBA) restores W₀ up to float rounding. Linear sites only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import PassError, RuleError
from ..rules import Selector, select
from ..sites import canonical_weight
from .base import AdapterModule, MethodConfig, register_method
from .lora import lora_scaling

__all__ = ["DoRA", "DoRALinear"]


@register_method
@dataclass(frozen=True)
class DoRA(MethodConfig):
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Selector | None = None
    rslora: bool = False
    init: str = "kaiming"          # "kaiming" | "gaussian" (of A; B starts at zero)

    name: ClassVar[str] = "dora"
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "linear_t"})

    def validate(self) -> None:
        self.require_positive_int("rank")
        self.require_fraction("dropout")
        if self.init not in ("kaiming", "gaussian"):
            raise RuleError(f"DoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)

    def default_targets(self) -> Selector:
        return select.role("attn.q") | select.role("attn.v")

    def decline(self, site) -> str | None:
        if self.rank > min(site.in_features, site.out_features):
            return f"rank {self.rank} exceeds min(in, out) = {min(site.in_features, site.out_features)}"
        return None

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> AdapterModule:
        return DoRALinear(canonical_weight(weight.detach(), site.kind), site.kind, self.rank, self.scaling,
                          self.dropout, self.init)


class DoRALinear(AdapterModule):
    """``forward(x, y, w, b)``: y plus the DoRA correction; parameters ``lora_A``, ``lora_B``,
    ``dora_magnitude`` (Hugging Face PEFT's ``lora_magnitude_vector``)."""

    mergeable: ClassVar[bool] = True
    reads_weight: ClassVar[bool] = True

    def __init__(self, weight: torch.Tensor, kind: str, rank: int, scaling: float, dropout: float, init: str):
        super().__init__()
        out_features, in_features = weight.shape
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.kind = kind
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.dora_magnitude = nn.Parameter(torch.empty(out_features, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._merged_norm: torch.Tensor | None = None
        if weight.device.type != "meta":
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            with torch.no_grad():
                self.dora_magnitude.copy_(torch.linalg.norm(weight.float(), dim=1).to(weight.dtype))

    def lora_delta(self) -> torch.Tensor:
        """s·BA as ``[out, in]``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W₀ + sBA‖ per output row, detached (a constant for backprop, DoRA §4.3)."""
        return torch.linalg.norm(weight + self.lora_delta().detach(), dim=1).detach()

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor | None = None) -> torch.Tensor:
        weight = canonical_weight(w, self.kind).to(x.dtype)
        scale = self.dora_magnitude / self.weight_norm(weight)
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
            base = F.linear(x, weight)
        else:
            base = y if b is None else y - b
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y + (scale - 1) * base + scale * lora * self.scaling

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        norm = self.weight_norm(weight.float())
        self._merged_norm = norm
        factor = (self.dora_magnitude.float() / norm)[:, None]
        weight.copy_((factor * (weight.float() + self.lora_delta().float())).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if self._merged_norm is None:
            raise PassError("unmerge: this DoRA adapter was not merged by this process (its weight norm is "
                            "unknown); merge it first or reload the base weights.")
        factor = (self.dora_magnitude.float() / self._merged_norm.to(weight.device))[:, None]
        weight.copy_((weight.float() / factor - self.lora_delta().float()).to(weight.dtype))
        self._merged_norm = None
