"""int8 weight storage: per-output-row absmax, w ≈ s_o·k, k ∈ [-127, 127]; dequantized on call."""
from __future__ import annotations

import torch
from torch import nn

from .recompute import note_dequantized as _note

__all__ = ["Int8Weight"]

class Int8Weight(nn.Module):
    """Dequantizer of one int8 weight: per row of the canonical ``[out, in]`` matrix, ŵ = s_o · k."""

    def __init__(self, shape: tuple[int, ...], transposed: bool):
        super().__init__()
        self.shape, self.transposed = tuple(shape), transposed
        rows, cols = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        self.register_buffer("qweight", torch.zeros(rows, cols, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(rows))

    @property
    def weight_meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.scale.dtype, device="meta")

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor, transposed: bool = False) -> "Int8Weight":
        m = cls(tuple(w.shape), transposed).to(w.device)
        canon = (w.t() if transposed else w).detach().float()
        s = canon.abs().amax(1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        m.qweight.copy_(torch.round(canon / s[:, None]).clamp_(-127, 127).to(torch.int8))
        m.scale = s.to(w.dtype if w.dtype.is_floating_point else torch.float32)
        return m

    def forward(self) -> torch.Tensor:
        w = self.qweight.float().mul_(self.scale.float()[:, None]).to(self.scale.dtype)
        out = w.t() if self.transposed else w
        _note(out, self)
        return out
