"""The module behind named adapters (:mod:`peftfx.multi`): several LoRA adapters on one site.

One ``MultiLoRA`` sits where a single LoRA module would (``{site}.lora``, an "output" adapter called
``m(x, y)``) and holds the unchanged single-adapter modules by name (``adapters.<name>``). It computes

    active names S:   y' = y + Σ_{n∈S} s_n B_n A_n x                         (S = ∅: the base model)
    mixed batch:      y'[b] = y[b] + s_k B_k A_k x[b],  k = idx[b]          (idx[b] = -1: the base)

The mixed batch is one gathered batched matmul (the S-LoRA/Punica idea in plain torch): the K adapters'
pairs are stacked into A ∈ ℝ^{K+1×R×in} and sB ∈ ℝ^{K+1×out×R} (ranks zero-padded to R, slot K all zeros for
the base and for adapters this site lacks), then ``h = bmm(x, A[idx]ᵀ)``, ``Δ = bmm(h, sB[idx]ᵀ)``.
Each active adapter runs through its own module, so a single active adapter computes exactly what the
single-adapter model does.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import PeftfxError
from ..methods import AdapterModule
from ..methods.lora import LoRAEmbedding, LoRALinear

__all__ = ["MultiLoRA", "lora_pair", "lora_factors"]


def lora_factors(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(a ∈ ℝ^{r×in}, b ∈ ℝ^{out×r}, s) with ``m.delta() == s · b @ a``."""
    if isinstance(m, LoRAEmbedding):
        return m.lora_embedding_A, m.lora_embedding_B, m.scaling
    if isinstance(m, LoRALinear):
        return m.lora_A, m.full_B(), m.scaling
    raise PeftfxError(f"named adapters hold LoRA modules, got {type(m).__name__}")


def lora_pair(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s·b): the scaling folded into b."""
    a, b, s = lora_factors(m)
    return a, b * s


def _dropout_p(m: nn.Module) -> float:
    d = getattr(m, "dropout", None)
    return float(d.p) if isinstance(d, nn.Dropout) else 0.0


class MultiLoRA(AdapterModule):
    """Named LoRA adapters of one site; ``active`` names are summed, ``rows`` (set by
    :func:`peftfx.multi.mixed_batch`) routes each batch row to one slot instead."""

    mergeable: ClassVar[bool] = True

    def __init__(self, embedding: bool):
        super().__init__()
        self.embedding = embedding
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.rows: torch.Tensor | None = None          # per-row slot index into self.adapters (K = base)
        self.merged_names: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self._mixed(x, y)
        for name in self.active:
            if name in self.adapters:
                y = self.adapters[name](x, y)
        return y

    def _stacks(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [lora_pair(m) for m in self.adapters.values()]
        R = max(a.shape[0] for a, _ in pairs)
        A = [F.pad(a, (0, 0, 0, R - a.shape[0])) for a, _ in pairs]
        B = [F.pad(b, (0, R - b.shape[1])) for _, b in pairs]
        A.append(torch.zeros_like(A[0]))
        B.append(torch.zeros_like(B[0]))
        return torch.stack(A).to(like.dtype), torch.stack(B).to(like.dtype)

    def _rows_for(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows = self.rows.to(x.device)
        n, b = x.shape[0], rows.shape[0]
        if n != b and not (x.dim() == 2 and b and n % b == 0):   # GPT-2's Conv1D flattens (batch·seq, in)
            raise PeftfxError(f"mixed batch: {b} adapter indices were given but the batch has {n} rows; pass one "
                              "adapter name (or None for the base model) per row of the batch.")
        return rows, b

    def _mixed(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows, b = self._rows_for(x)
        A, B = self._stacks(y)
        if self.embedding:                     # A: [K+1, R, vocab]; look every slot up, keep each row's own
            k1, R, _ = A.shape
            ids = x.reshape(b, -1)
            h_all = F.embedding(ids, A.permute(2, 0, 1).reshape(-1, k1 * R)).view(b, ids.shape[1], k1, R)
            h = h_all[torch.arange(b, device=x.device), :, rows]                 # [b, T, R]
        else:
            xs = x.reshape(b, -1, x.shape[-1])
            xs = self._row_dropout(xs, rows)
            h = torch.bmm(xs.to(A.dtype), A[rows].transpose(1, 2))               # [b, T, R]
        d = torch.bmm(h, B[rows].transpose(1, 2))                                # [b, T, out]
        return y + d.reshape(y.shape).to(y.dtype)

    def _row_dropout(self, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ps = [_dropout_p(m) for m in self.adapters.values()] + [0.0]
        if not self.training or not any(ps):
            return xs
        p = torch.tensor(ps, device=xs.device, dtype=xs.dtype)[rows].view(-1, 1, 1)
        keep = (torch.rand_like(xs) >= p).to(xs.dtype)
        return xs * keep / (1.0 - p)

    # --------------------------------------------------------------------------------------- merge
    def delta(self, names: tuple[str, ...] | None = None) -> torch.Tensor:
        names = self.active if names is None else names
        mods = [self.adapters[n] for n in names if n in self.adapters]
        if not mods:
            a, b = lora_pair(next(iter(self.adapters.values())))
            return torch.zeros(b.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
        return sum(m.delta() for m in mods)

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if self.rows is not None:
            raise PeftfxError("cannot merge while a mixed batch is routed; leave the mixed_batch() block first.")
        self.merged_names = tuple(n for n in self.active if n in self.adapters)
        weight += self.delta(self.merged_names).to(weight.dtype)

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight -= self.delta(self.merged_names).to(weight.dtype)
        self.merged_names = ()
