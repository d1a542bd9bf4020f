"""IA3 — Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (arXiv:2205.05638): (IA)³, Infused Adapter by Inhibiting and Amplifying Inner Activations.

    output position (keys, values):       y = (W₀x + b) ⊙ l,    l ∈ ℝ^{out}
    input position (MLP down-projection):  y = W₀(x ⊙ l) + b,    l ∈ ℝ^{in}   (the FFN inner activation)

``l`` (parameter ``ia3_l``) starts at ones, so an untrained IA3 is the identity. Default sites are chosen by
role: ``attn.k | attn.v | mlp.down``. Any linear site can take IA3 through ``targets``; the position is decided
by the site's roles — a site with role ``mlp.down`` is scaled at its input, every other site at its output.
``feedforward=`` (a selector) overrides that choice: the sites it matches are scaled at the input, all others
at the output — Hugging Face PEFT's ``feedforward_modules``. Embeddings are declined.

On a fused QKV projection (GPT-2's ``c_attn``) selected by role, only the rows of the selected q/k/v slices
are scaled (``ia3_l`` holds just those rows; the scale is one elsewhere). A fused site selected as a whole —
by name, type or role ``attn.qkv`` — is scaled on all its outputs, as Hugging Face PEFT does for ``c_attn``.

Merging folds the vector into the canonical ``[out, in]`` weight: output scaling W ← diag(l) W and b ← l ⊙ b,
input scaling W ← W diag(l) (the bias is untouched). Unmerging divides by ``l``; a zero entry makes that
impossible and is reported.

IA3 composes with LoRA on one site. Output adapters on a site chain in rule order (LoRA then IA3 gives
y = l ⊙ (W₀x + b + sBAx); IA3 then LoRA gives l ⊙ (W₀x + b) + sBAx), and every output adapter reads the
input the weight reads, so input-position IA3 with LoRA is y = (W₀ + sBA)(x ⊙ l) + b in either order.
Both forms merge exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._errors import PassError, RuleError, SiteError
from ..rules import Selector, select, selector_from_dict
from .base import AdapterModule, MethodConfig, register_method

__all__ = ["IA3", "IA3Output", "IA3Input"]

_QKV = ("attn.q", "attn.k", "attn.v")


@register_method
@dataclass(frozen=True)
class IA3(MethodConfig):
    """IA3 rule: ``targets`` picks sites (default ``attn.k | attn.v | mlp.down``); ``feedforward``, when given,
    picks which of them are scaled at the input (default: the sites with role ``mlp.down``)."""

    targets: Selector | None = None
    feedforward: Selector | None = None

    name: ClassVar[str] = "ia3"
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "linear_t"})
    composes: ClassVar[bool] = True

    def __post_init__(self):
        ff = self.feedforward
        if ff is not None and not isinstance(ff, Selector):
            try:
                object.__setattr__(self, "feedforward", selector_from_dict(ff))
            except RuleError as e:
                raise RuleError(f"IA3 feedforward must be a selector (or its data form): {e}") from None
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["feedforward"] = None if self.feedforward is None else self.feedforward.to_dict()
        return out

    def default_targets(self) -> Selector:
        return select.role("attn.k") | select.role("attn.v") | select.role("mlp.down")

    def position(self, site) -> str:
        """Where ``l`` acts: ``"input"`` on feed-forward sites (``feedforward`` selector, else role ``mlp.down``),
        ``"output"`` elsewhere."""
        if self.feedforward is not None:
            return "input" if self.feedforward.matches(site) else "output"
        return "input" if "mlp.down" in site.roles else "output"

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> AdapterModule:
        kw = dict(device=weight.device, dtype=weight.dtype)
        if self.position(site) == "input":
            return IA3Input(site.in_features, **kw)
        return IA3Output(site.out_features, _spans(site, roles), **kw)


def _spans(site, roles: set[str]) -> list[tuple[int, int]]:
    """Output rows to scale: the selected q/k/v slices of a fused projection selected by role, else all."""
    full = [(0, site.out_features)]
    if "attn.qkv" not in site.roles or "attn.qkv" in roles:
        return full
    chosen = [r for r in _QKV if r in roles]
    if not chosen:
        return full
    missing = [r for r in chosen if r not in site.slices]
    if missing:
        raise SiteError(
            f"IA3 was asked for {', '.join(missing)} of the fused projection '{site.key}', but the rows that "
            f"belong to {'it' if len(missing) == 1 else 'them'} could not be located in the graph (slices found: "
            f"{sorted(site.slices) or 'none'}). Select the whole projection instead, e.g. "
            f"targets=select.name('{site.key}'), to scale all of its outputs.")
    return sorted(site.slices[r] for r in chosen)


class IA3Output(AdapterModule):
    """``forward(x, y) = y ⊙ l_full``; ``l_full`` holds ``ia3_l`` in the selected rows and ones elsewhere."""

    position: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = True

    def __init__(self, out_features: int, spans, device=None, dtype=None):
        super().__init__()
        self.out_features = out_features
        self.spans = [tuple(s) for s in spans]
        rows = sum(e - s for s, e in self.spans)
        self.ia3_l = nn.Parameter(torch.ones(rows, device=device, dtype=dtype))

    def scale(self) -> torch.Tensor:
        """The ``[out]`` scale vector."""
        if self.spans == [(0, self.out_features)]:
            return self.ia3_l
        pieces, pos, row = [], 0, 0
        for s, e in self.spans:
            if s > pos:
                pieces.append(self.ia3_l.new_ones(s - pos))
            pieces.append(self.ia3_l[row: row + e - s])
            row, pos = row + e - s, e
        if pos < self.out_features:
            pieces.append(self.ia3_l.new_ones(self.out_features - pos))
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale()

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        l = self.scale().to(weight.dtype)
        weight.mul_(l[:, None])
        if bias is not None:
            bias.mul_(l.to(bias.dtype))

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        l = _invertible(self.scale()).to(weight.dtype)
        weight.div_(l[:, None])
        if bias is not None:
            bias.div_(l.to(bias.dtype))


class IA3Input(AdapterModule):
    """``forward(x) = x ⊙ l``: the site reads the rescaled activation."""

    position: ClassVar[str] = "input"
    mergeable: ClassVar[bool] = True

    def __init__(self, in_features: int, device=None, dtype=None):
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight.mul_(self.ia3_l.to(weight.dtype)[None, :])

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight.div_(_invertible(self.ia3_l).to(weight.dtype)[None, :])


def _invertible(l: torch.Tensor) -> torch.Tensor:
    zeros = int((l == 0).sum())
    if zeros:
        raise PassError(f"pass 'unmerge': an IA3 vector has {zeros} zero entr{'y' if zeros == 1 else 'ies'}, so the "
                        "merged weight lost those rows/columns and cannot be divided back. Reload the base "
                        "weights and apply the adapter again instead of unmerging.")
    return l
