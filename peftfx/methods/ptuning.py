"""P-tuning — Liu et al. 2021, "GPT Understands, Too" (arXiv:2103.10385).

    P = f(E_p),   E_p ∈ ℝ^{N×e} a small trainable embedding table,  h₀ = [P; E(x)]

    f = MLP:   Linear(e, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)
    f = LSTM:  bidirectional LSTM(e → h, ``encoder_num_layers`` layers) → Linear(2h, 2h) → ReLU → Linear(2h, d)

The N virtual tokens come from a prompt encoder f over a small table instead of being free parameters; they are
placed before the real tokens at the token-embedding output exactly as in prompt tuning (see
:mod:`peftfx.methods.prompt` for what happens to masks, positions and outputs: real-token outputs only).
Only the table and the encoder train. ``token_dim`` (e, default: the model's embedding width d) is the
table's width, ``encoder_hidden_size`` (h, default e) the encoder's; with the defaults the module and its
parameter count equal Hugging Face PEFT's ``PromptEncoder`` (``PromptEncoderConfig``). Nothing in f depends
on the inputs, so :func:`peftfx.fold` evaluates P once and inference runs no encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .._errors import RuleError
from ._virtual import EmbeddingTokensMethod, SequenceEdit, VirtualSource
from ..rules import Selector
from .base import register_method

__all__ = ["PTuning", "PromptEncoder"]


@register_method
@dataclass(frozen=True)
class PTuning(EmbeddingTokensMethod):
    """P-tuning rule: ``num_virtual_tokens`` tokens produced by an MLP or LSTM prompt encoder."""

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    token_dim: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    targets: Selector | None = None

    name: ClassVar[str] = "ptuning"

    def validate(self) -> None:
        self.require_positive_int("num_virtual_tokens", "encoder_num_layers")
        self.require_positive_int("encoder_hidden_size", "token_dim", optional=True)
        if self.encoder not in ("mlp", "lstm"):
            raise RuleError(f"PTuning encoder must be 'mlp' or 'lstm', got {self.encoder!r}")
        self.require_fraction("encoder_dropout")

    def make_source(self, pm, edit: SequenceEdit, weight: torch.Tensor) -> nn.Module:
        dim = edit.site.out_features
        e = self.token_dim or dim
        return PromptEncoder(self.num_virtual_tokens, e, self.encoder_hidden_size or e, dim, self.encoder,
                             self.encoder_num_layers, float(self.encoder_dropout), device=weight.device,
                             dtype=weight.dtype)


class PromptEncoder(VirtualSource):
    """``forward() = f(E_p)`` ∈ ℝ^{N×d}: the prompt encoder over its ``ptuning_embedding`` table."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, hidden: int, out_dim: int, encoder: str = "mlp",
                 num_layers: int = 2, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.encoder = encoder
        self.ptuning_embedding = nn.Parameter(torch.empty(num_virtual_tokens, token_dim, **kw))
        if self.ptuning_embedding.device.type != "meta":
            nn.init.normal_(self.ptuning_embedding)
        if encoder == "lstm":
            self.ptuning_lstm = nn.LSTM(token_dim, hidden, num_layers=num_layers, dropout=dropout,
                                        bidirectional=True, batch_first=True, **kw)
            width = 2 * hidden
            layers = [nn.Linear(width, width, **kw), nn.ReLU(), nn.Linear(width, out_dim, **kw)]
        else:
            self.ptuning_lstm = None
            layers = [nn.Linear(token_dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                      nn.Linear(hidden, out_dim, **kw)]
        self.ptuning_mlp = nn.Sequential(*layers)

    def forward(self) -> torch.Tensor:
        x = self.ptuning_embedding
        if self.ptuning_lstm is not None:
            x = self.ptuning_lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.ptuning_mlp(x)
