"""Houlsby adapters — Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751).

A bottleneck module added with a residual to the output of the attention block and/or the MLP block, before
the block's own residual add:

    norm_position="pre":   y' = y + W_up · dropout(act(W_down · norm(y) + b_down)) + b_up
    norm_position="post":  y' = y + norm(W_up · dropout(act(W_down · y + b_down)) + b_up)

W_down ∈ ℝ^{m×d}, W_up ∈ ℝ^{d×m} with bottleneck m; 2md + d + m parameters per site (plus the norm's). In the
graph the attention block's output is the output of the ``attn.o`` site and the MLP block's output that of the
``mlp.down`` site, so ``blocks`` ("attn", "mlp", "both") picks the default targets by role; ``targets``
overrides it. ``norm`` is "layernorm" (eps 1e-5), "rmsnorm" (eps 1e-6) or "none".

W_down and b_down start as ``nn.Linear`` does (Kaiming-uniform); W_up and b_up start at zero, so an untrained
adapter is exactly the identity (LayerNorm and RMSNorm of a zero vector are zero, so "post" too). The default
activation is SiLU ("swish", as AdapterHub's Houlsby configuration). The adapter is not linear in its input,
so it is not mergeable: merge leaves it in the graph and export keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .._errors import RuleError
from ..rules import Selector, select
from .base import AdapterModule, MethodConfig, register_method

__all__ = ["Houlsby", "Adapter", "HoulsbyAdapter"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_NORMS = ("layernorm", "rmsnorm", "none")
_BLOCKS = {"attn": ("attn.o",), "mlp": ("mlp.down",), "both": ("attn.o", "mlp.down")}


@register_method
@dataclass(frozen=True)
class Houlsby(MethodConfig):
    """Houlsby adapter rule. ``blocks`` picks the default sites; ``targets`` (a selector) replaces them."""

    bottleneck: int = 64
    activation: str = "silu"
    dropout: float = 0.0
    norm: str = "none"
    norm_position: str = "pre"
    blocks: str = "both"
    targets: Selector | None = None

    name: ClassVar[str] = "adapter"
    aliases: ClassVar[tuple[str, ...]] = ("houlsby",)
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "linear_t"})
    composes: ClassVar[bool] = True

    def validate(self) -> None:
        self.require_positive_int("bottleneck")
        if self.activation not in _ACTIVATIONS:
            raise RuleError(f"Houlsby activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        self.require_fraction("dropout")
        if self.norm not in _NORMS:
            raise RuleError(f"Houlsby norm must be one of {list(_NORMS)}, got {self.norm!r}")
        if self.norm_position not in ("pre", "post"):
            raise RuleError(f"Houlsby norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        if self.blocks not in _BLOCKS:
            raise RuleError(f"Houlsby blocks must be one of {sorted(_BLOCKS)}, got {self.blocks!r}")

    def default_targets(self) -> Selector:
        return select.role(*_BLOCKS[self.blocks])

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> AdapterModule:
        return HoulsbyAdapter(site.out_features, self.bottleneck, self.activation, float(self.dropout), self.norm,
                              self.norm_position, device=weight.device, dtype=weight.dtype)


class HoulsbyAdapter(AdapterModule):
    """``forward(x, y) = y + up(dropout(act(down(norm(y)))))`` (pre) or ``y + norm(up(…(down(y))))`` (post)."""

    position: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = False
    reads_input: ClassVar[bool] = False   # uses only the site's output y, never its input x

    def __init__(self, features: int, bottleneck: int, activation: str, dropout: float, norm: str,
                 norm_position: str, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm_position = norm_position
        self.adapter_down = nn.Linear(features, bottleneck, **kw)
        self.adapter_up = nn.Linear(bottleneck, features, **kw)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if norm == "layernorm":
            self.adapter_norm = nn.LayerNorm(features, eps=1e-5, **kw)
        elif norm == "rmsnorm":
            self.adapter_norm = nn.RMSNorm(features, eps=1e-6, **kw)
        else:
            self.adapter_norm = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pre = self.adapter_norm is not None and self.norm_position == "pre"
        h = self.adapter_norm(y) if pre else y
        h = self.adapter_up(self.dropout(self.act(self.adapter_down(h))))
        if self.adapter_norm is not None and not pre:
            h = self.adapter_norm(h)
        return y + h


#: the name of the first releases; the registry key stays "adapter" (saved rules keep loading)
Adapter = Houlsby
