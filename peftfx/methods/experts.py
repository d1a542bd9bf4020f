"""Adapters on mixture-of-experts weights (site kind ``experts``: a 3-D parameter ``[E, a, b]``, one matrix per
expert, see :mod:`peftfx.sites`). They act on the weight itself, ``W ↦ W'``, so whatever op reads it (a grouped
matmul, a gather by expert id and ``bmm``, a per-expert pick) computes with the adapted experts; they sit in the
graph as ``m(None, W) → W'`` after the weight's ``get_attr``, and merging writes ``W'`` into the weight.

LoRA — Hugging Face PEFT's ``target_parameters`` (its ``ParamWrapper``): one pair per expert,

    W'[e] = W[e] + s · B_e A_e,   A_e ∈ ℝ^{r×in},  B_e ∈ ℝ^{out×r},  s = α/r (rsLoRA α/√r)

(transposed when the expert matrices are stored ``[in, out]``), kept in HF's layout so checkpoints map one to one:
``lora_A`` ``[E·r, in]`` holds A_e in rows e·r…(e+1)·r, ``lora_B`` ``[out, r·E]`` holds B_e in columns
j·E + e (j < r). A starts Kaiming-uniform (a = √5, fan-in ``in``) or N(0, 1/r), B at zero; E·r·(in + out)
parameters. There is no LoRA dropout here: the update is a weight, not a product with the input (HF PEFT refuses
``lora_dropout`` on parameters too).

IA3 — one vector per expert, ``l ∈ ℝ^{E×n}``, starting at ones: on a feed-forward site (the experts' down
projection, role ``mlp.experts.down``, or ``feedforward=``) it scales each expert's input features, W'[e] =
W[e] diag(l_e), which is the expert's inner activation scaled before the down projection (as IA3 on Mixtral's
per-expert ``w2`` in earlier transformers); elsewhere its output features, W'[e] = diag(l_e) W[e] — on a fused
``gate_up_proj`` selected by role only the rows of the selected piece (``mlp.experts.up`` or ``gate``).
E·n parameters. Merging multiplies the weight by the scale; unmerging divides (a zero entry cannot be undone).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from .._errors import PassError
from .base import AdapterModule

__all__ = ["IA3Experts", "LoRAExperts", "decline_experts_lora", "ia3_experts", "lora_experts"]

_PIECES = ("mlp.experts.gate", "mlp.experts.up")


def decline_experts_lora(config, site) -> str | None:
    """Why a LoRA config cannot take an ``experts`` site (None: it can)."""
    if config.dropout:
        return (f"LoRA on expert weights adds a per-expert ΔW to the weight itself (HF PEFT's target_parameters), "
                f"so there is no input to drop out; dropout={config.dropout} — use dropout=0.0 for these sites")
    return None


def lora_experts(config, site, weight: torch.Tensor) -> LoRAExperts:
    return LoRAExperts(site.experts.num_experts, site.in_features, site.out_features, config.rank, config.scaling,
                       config.init, site.experts.transposed, device=weight.device, dtype=weight.dtype)


def ia3_experts(site, weight: torch.Tensor, roles, feedforward: bool) -> IA3Experts:
    spec, n = site.experts, (site.in_features if feedforward else site.out_features)
    spans = [(0, n)]
    chosen = [r for r in _PIECES if r in roles and r in site.slices]
    if not feedforward and chosen and len(chosen) < len([r for r in _PIECES if r in site.slices]):
        spans = sorted(site.slices[r] for r in chosen)
    return IA3Experts(spec.num_experts, n, spans, "input" if feedforward else "output", spec.transposed,
                      device=weight.device, dtype=weight.dtype)


class LoRAExperts(AdapterModule):
    """``forward(None, W) = W + s · B_e A_e`` for every expert e (see the module docstring for the layout)."""

    mergeable: ClassVar[bool] = True
    reads_input: ClassVar[bool] = False

    def __init__(self, num_experts, in_features, out_features, rank, scaling, init, transposed, device=None,
                 dtype=None):
        super().__init__()
        self.num_experts, self.rank, self.scaling, self.transposed = num_experts, rank, scaling, transposed
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank * num_experts, device=device, dtype=dtype))
        if self.lora_A.device.type != "meta":          # as LoRA's A on a [r·E, in] matrix (HF PEFT's nn.Linear)
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A ``[E, r, in]``, B ``[E, out, r]``)."""
        e, r = self.num_experts, self.rank
        a = self.lora_A.view(e, r, self.lora_A.shape[1])
        b = self.lora_B.view(self.lora_B.shape[0], r, e).permute(2, 0, 1)
        return a, b

    def delta(self) -> torch.Tensor:
        """ΔW as the weight is stored: ``[E, out, in]`` (``[E, in, out]`` when transposed)."""
        a, b = self.factors()
        d = torch.bmm(b, a) * self.scaling
        return d.transpose(1, 2) if self.transposed else d

    def forward(self, x: None, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta().to(w.dtype)


class IA3Experts(AdapterModule):
    """``forward(None, W) = W ⊙ l`` with ``l`` per expert over the output (or, ``side="input"``, input) features."""

    mergeable: ClassVar[bool] = True
    reads_input: ClassVar[bool] = False

    def __init__(self, num_experts, features, spans, side, transposed, device=None, dtype=None):
        super().__init__()
        self.features, self.side, self.transposed = features, side, transposed
        self.spans = [tuple(s) for s in spans]
        rows = sum(e - s for s, e in self.spans)
        self.ia3_l = nn.Parameter(torch.ones(num_experts, rows, device=device, dtype=dtype))

    def scale(self) -> torch.Tensor:
        """``[E, features]``: ``ia3_l`` in the selected columns, ones elsewhere."""
        if self.spans == [(0, self.features)]:
            return self.ia3_l
        full, row = self.ia3_l.new_ones(self.ia3_l.shape[0], self.features), 0
        for s, e in self.spans:
            full = torch.cat([full[:, :s], self.ia3_l[:, row: row + e - s], full[:, e:]], dim=1)
            row += e - s
        return full

    def _shaped(self, like: torch.Tensor) -> torch.Tensor:
        """The scale broadcast over the stored weight ``[E, a, b]``."""
        rows = (self.side == "output") != self.transposed      # the features are the stored weight's dim 1
        l = self.scale().to(like.dtype)
        return l[:, :, None] if rows else l[:, None, :]

    def forward(self, x: None, w: torch.Tensor) -> torch.Tensor:
        return w * self._shaped(w)

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight.mul_(self._shaped(weight))

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        zeros = int((self.ia3_l == 0).sum())
        if zeros:
            raise PassError(f"pass 'unmerge': an expert IA3 vector has {zeros} zero entr"
                            f"{'y' if zeros == 1 else 'ies'}, so the merged expert weights lost those features and "
                            "cannot be divided back. Reload the base weights and apply the adapter again instead.")
        weight.div_(self._shaped(weight))
