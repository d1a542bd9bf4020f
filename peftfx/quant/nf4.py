"""NF4 (4-bit NormalFloat with double-quantized absmax) weight storage, dequantized on call.
The format and its error bounds are described in :mod:`peftfx.quant`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .recompute import note_dequantized as _note

__all__ = ["NF4Weight", "NF4_CODE"]

#: NormalFloat4 (QLoRA appendix E; bitsandbytes' table) — derived in tests from Φ⁻¹ quantiles.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
_CHUNK = 1 << 22

class NF4Weight(nn.Module):
    """Dequantizer of one NF4 weight: ``forward() → ŵ`` (shape and dtype of the weight it replaced; the
    dtype follows ``.to()`` through the float buffer ``absmax_scale``)."""

    def __init__(self, shape: tuple[int, ...], blocksize: int = 64, scale_blocksize: int = 256):
        super().__init__()
        self.shape, self.blocksize, self.scale_blocksize = tuple(shape), blocksize, scale_blocksize
        n = _ceil(_numel(shape), blocksize)
        nb = n // blocksize
        self.register_buffer("packed", torch.zeros(n // 2, dtype=torch.uint8))
        self.register_buffer("absmax_q", torch.zeros(nb, dtype=torch.int8))
        self.register_buffer("absmax_scale", torch.zeros(_ceil(nb, scale_blocksize) // scale_blocksize))
        self.register_buffer("absmax_mean", torch.zeros(()))
        self.register_buffer("code", torch.tensor(NF4_CODE), persistent=False)

    @property
    def weight_meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.absmax_scale.dtype, device="meta")

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor, blocksize: int = 64, scale_blocksize: int = 256) -> "NF4Weight":
        m = cls(tuple(w.shape), blocksize, scale_blocksize).to(w.device)
        flat = F.pad(w.detach().reshape(-1).float(), (0, m.packed.numel() * 2 - w.numel()))
        c = flat.view(-1, blocksize).abs().amax(1)
        mean = c.mean()
        cs = F.pad(c - mean, (0, m.absmax_scale.numel() * scale_blocksize - c.numel())).view(-1, scale_blocksize)
        s2 = cs.abs().amax(1) / 127
        s2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
        k = torch.round(cs / s2[:, None]).clamp_(-127, 127).reshape(-1)[: c.numel()]
        m.absmax_q.copy_(k.to(torch.int8))
        m.absmax_scale = s2.to(w.dtype if w.dtype.is_floating_point else torch.float32)
        m.absmax_mean.copy_(mean)
        chat = m._absmax()
        mids = (m.code[1:] + m.code[:-1]) / 2
        for s in range(0, flat.numel(), _CHUNK):                      # chunked: bounded temporaries
            blk = flat[s: s + _CHUNK].view(-1, blocksize)
            c_ = chat[s // blocksize: s // blocksize + blk.shape[0], None]
            v = blk / torch.where(c_ > 0, c_, torch.ones_like(c_))
            q = torch.bucketize(v.clamp_(-1, 1), mids).to(torch.uint8).view(-1, 2)
            m.packed[s // 2: s // 2 + q.shape[0]] = (q[:, 0] << 4) | q[:, 1]
        return m

    def _absmax(self) -> torch.Tensor:
        s2 = self.absmax_scale.float().repeat_interleave(self.scale_blocksize)[: self.absmax_q.numel()]
        return (self.absmax_q.float() * s2 + self.absmax_mean.float()).clamp_(min=0)

    def indices(self) -> torch.Tensor:
        """The 4-bit code indices, one per (padded) element."""
        return torch.stack([self.packed >> 4, self.packed & 0x0F], -1).reshape(-1)

    def forward(self) -> torch.Tensor:
        lut = torch.stack([self.code.repeat_interleave(16), self.code.repeat(16)], -1)   # byte → (hi, lo)
        c = self._absmax()
        full = torch.empty(self.packed.numel() * 2, device=self.packed.device)
        step = _CHUNK // 2                     # bytes per chunk (a multiple of the block): bounded temporaries
        for s in range(0, self.packed.numel(), step):
            v = F.embedding(self.packed[s: s + step].to(torch.int32), lut).view(-1, self.blocksize)
            b0 = 2 * s // self.blocksize
            full[2 * s: 2 * s + v.numel()] = v.mul_(c[b0: b0 + v.shape[0], None]).view(-1)
        out = full[: _numel(self.shape)].view(self.shape).to(self.absmax_scale.dtype)
        _note(out, self)
        return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _ceil(n: int, k: int) -> int:
    return -(-n // k) * k
