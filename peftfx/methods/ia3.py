"""IA3 — Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (arXiv:2205.05638): (IA)³, Infused Adapter by Inhibiting and Amplifying Inner Activations.

    output position (keys, values):       y = (W₀x + b) ⊙ l,    l ∈ ℝ^{out}
    input position (MLP down-projection):  y = W₀(x ⊙ l) + b,    l ∈ ℝ^{in}   (the FFN inner activation)

``l`` (parameter ``ia3_l``) starts at ones, so an untrained IA3 is the identity. Default sites are chosen by
role: ``attn.k | attn.v | mlp.down | mlp.experts.down`` (mixture-of-experts weights: one vector per expert,
see :mod:`.experts`). Any linear site can take IA3 through ``targets``; the position is decided
by the site's roles — a site with role ``mlp.down`` is scaled at its input, every other site at its output.
``feedforward=`` (a selector) overrides that choice: the sites it matches are scaled at the input, all others
at the output — Hugging Face PEFT's ``feedforward_modules``. Embeddings are declined.

On a fused QKV projection (GPT-2's ``c_attn``, Phi3's ``qkv_proj``, GPT-NeoX/BLOOM's per-head interleaved
``query_key_value``) selected by role, only the rows of the selected q/k/v slices are scaled (``ia3_l`` holds just
those rows, in ascending row order; the scale is one elsewhere). A fused site selected as a whole —
by name, type or role ``attn.qkv`` — is scaled on all its outputs, as Hugging Face PEFT does for ``c_attn``.

On a convolution (``nn.Conv1d/2d/3d``) ``l`` scales channels, as in Hugging Face PEFT: output channels
(y ⊙ l over dimension 1, every position alike) or, on feed-forward sites, input channels. Only ``feedforward=``
makes a convolution an input-scaled site (convolutions take no MLP role).

Merging folds the vector into the canonical ``[out, in]`` weight: output scaling W ← diag(l) W and b ← l ⊙ b,
input scaling W ← W diag(l) (the bias is untouched); a convolution's ``[out, in/groups, *kernel]`` weight
scales along its output or input channels (within each group, for a grouped one). Unmerging divides by ``l``; a zero entry makes that
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
from ..sites import slice_ranges
from .base import AdapterModule, MethodConfig, register_method
from .experts import ia3_experts

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
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "linear_t", "conv", "experts"})
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
        return select.role("attn.k") | select.role("attn.v") | select.role("mlp.down") | select.role("mlp.experts.down")

    def position(self, site) -> str:
        """Where ``l`` acts: ``"input"`` on feed-forward sites (``feedforward`` selector, else role ``mlp.down``),
        ``"output"`` elsewhere."""
        if self.feedforward is not None:
            return "input" if self.feedforward.matches(site) else "output"
        return "input" if site.roles & {"mlp.down", "mlp.experts.down"} else "output"

    def decline(self, site) -> str | None:
        if self.position(site) == "output" and site.bias is None and site.bias_operand is not None:
            return ("its bias is computed in the graph (a slice of another parameter, e.g. a MultiheadAttention "
                    "with separate q/k/v weights), so output scaling could not be merged into it")
        return None

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> AdapterModule:
        if site.kind == "experts":
            return ia3_experts(site, weight, roles, self.position(site) == "input")
        kw = dict(device=weight.device, dtype=weight.dtype)
        spatial = site.conv.dims if site.kind == "conv" else 0
        if self.position(site) == "input":
            return IA3Input(site.in_features, spatial=spatial, groups=site.conv.groups if spatial else 1, **kw)
        return IA3Output(site.out_features, _spans(site, roles), spatial=spatial, **kw)


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
    return sorted(r for role in chosen for r in slice_ranges(site.slices[role]))


class IA3Output(AdapterModule):
    """``forward(x, y) = y ⊙ l_full``; ``l_full`` holds ``ia3_l`` in the selected rows and ones elsewhere
    (``spatial`` > 0: a convolution's output channels, dimension ``-spatial-1``)."""

    position: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = True

    def __init__(self, out_features: int, spans, spatial: int = 0, device=None, dtype=None):
        super().__init__()
        self.out_features = out_features
        self.spatial = spatial
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
        return y * _channels(self.scale(), self.spatial)

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        l = self.scale().to(weight.dtype)
        weight.mul_(l.view(-1, *([1] * (weight.dim() - 1))))
        if bias is not None:
            bias.mul_(l.to(bias.dtype))

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        l = _invertible(self.scale()).to(weight.dtype)
        weight.div_(l.view(-1, *([1] * (weight.dim() - 1))))
        if bias is not None:
            bias.div_(l.to(bias.dtype))


class IA3Input(AdapterModule):
    """``forward(x) = x ⊙ l``: the site reads the rescaled activation (``spatial`` > 0: a convolution's input
    channels, dimension ``-spatial-1``; ``groups``: the convolution's channel groups, for merging)."""

    position: ClassVar[str] = "input"
    mergeable: ClassVar[bool] = True

    def __init__(self, in_features: int, spatial: int = 0, groups: int = 1, device=None, dtype=None):
        super().__init__()
        self.spatial, self.groups = spatial, groups
        self.ia3_l = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _channels(self.ia3_l, self.spatial)

    def _per_weight(self, weight: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        """``l`` shaped to multiply the weight ``[out, in/groups, …]``: column j of output o's group g is input
        channel g·in/groups + j."""
        ones = [1] * (weight.dim() - 2)
        if self.groups == 1:
            return l.view(1, -1, *ones)
        g, out, per = self.groups, weight.shape[0], weight.shape[1]
        return l.view(g, 1, per).expand(g, out // g, per).reshape(out, per, *ones)

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight.mul_(self._per_weight(weight, self.ia3_l.to(weight.dtype)))

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight.div_(self._per_weight(weight, _invertible(self.ia3_l).to(weight.dtype)))


def _channels(l: torch.Tensor, spatial: int) -> torch.Tensor:
    """``l`` broadcast over the last dimension (``spatial`` 0) or a convolution's channel dimension."""
    return l if not spatial else l.view(-1, *([1] * spatial))


def _invertible(l: torch.Tensor) -> torch.Tensor:
    zeros = int((l == 0).sum())
    if zeros:
        raise PassError(f"pass 'unmerge': an IA3 vector has {zeros} zero entr{'y' if zeros == 1 else 'ies'}, so the "
                        "merged weight lost those rows/columns and cannot be divided back. Reload the base "
                        "weights and apply the adapter again instead of unmerging.")
    return l
