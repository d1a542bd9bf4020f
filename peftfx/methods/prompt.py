"""Prompt tuning — Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691).

    h₀ = [P; E(x)],   P ∈ ℝ^{N×d} trainable,  E the frozen token embedding,  x the S real token ids

N virtual-token embeddings are placed before the real tokens at the token-embedding output (the site with role
``embed``); only P trains (N·d parameters, as Hugging Face PEFT's ``PromptTuningConfig``). The graph is
rewritten by widening the sequence (see :mod:`peftfx.methods._virtual`): the model runs on N + S positions, so real
tokens take positions N…N+S-1, the attention mask gets N leading ones, causal attention lets every real token
see every virtual one, causal-LM labels get N leading -100s — all as in Hugging Face PEFT.

**Outputs.** Every output that runs along the token sequence (logits, hidden states) is returned for the S real
tokens only, in the shape the base model returns; outputs for the virtual positions are dropped (Hugging Face
PEFT returns N + S logits for a causal LM — compare ``hf_logits[:, N:]`` with ours). Pooled outputs (a BERT
classifier reads position 0, which is now the first virtual token, as in Hugging Face PEFT) and losses are
computed inside the graph on the widened sequence, unchanged.

Init: ``"random"`` (N(0, 1), like ``nn.Embedding``), ``"vocab"`` (rows of the token embedding at random ids),
``"text"`` (the embeddings of ``init_token_ids`` or of ``init_text`` tokenized with ``tokenizer``, repeated
or cut to N, as Hugging Face PEFT's ``PromptTuningInit.TEXT``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .._errors import RuleError, SiteError
from ._virtual import EmbeddingTokensMethod, SequenceEdit, VirtualSource
from ..rules import Selector
from .base import register_method

__all__ = ["PromptTuning", "PromptEmbedding"]

_INITS = ("random", "vocab", "text")


@register_method
@dataclass(frozen=True)
class PromptTuning(EmbeddingTokensMethod):
    """Prompt-tuning rule: ``num_virtual_tokens`` trainable embeddings before the real tokens."""

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    init_token_ids: tuple[int, ...] | None = None
    targets: Selector | None = None

    name: ClassVar[str] = "prompt"

    def validate(self) -> None:
        self.require_positive_int("num_virtual_tokens")
        if self.init not in _INITS:
            raise RuleError(f"PromptTuning init must be one of {list(_INITS)}, got {self.init!r}")
        if self.init == "text" and not self.init_token_ids and not (self.init_text and self.tokenizer):
            raise RuleError("PromptTuning init='text' needs init_token_ids, or init_text together with tokenizer "
                            "(a tokenizer name or local path for transformers.AutoTokenizer)")

    def prepare(self, pm, plan, index: int) -> SequenceEdit:
        edit = super().prepare(pm, plan, index)
        if self.init == "text":
            ids = self.text_ids()
            vocab = edit.site.weight_shape[0]
            if any(not 0 <= i < vocab for i in ids):
                raise SiteError(f"PromptTuning init token ids must lie in [0, {vocab}) for {edit.site.key}; "
                                f"got {sorted(set(i for i in ids if not 0 <= i < vocab))[:5]}")
        return edit

    def text_ids(self) -> list[int]:
        """The init token ids, repeated or cut to ``num_virtual_tokens``."""
        if self.init_token_ids:
            ids = [int(i) for i in self.init_token_ids]
        else:
            from transformers import AutoTokenizer

            ids = list(AutoTokenizer.from_pretrained(self.tokenizer)(self.init_text)["input_ids"])
        if not ids:
            raise RuleError("PromptTuning init text tokenizes to no token ids")
        n = self.num_virtual_tokens
        return (ids * math.ceil(n / len(ids)))[:n]

    def make_source(self, pm, edit: SequenceEdit, weight: torch.Tensor) -> nn.Module:
        init = None
        if weight.device.type != "meta" and self.init != "random":
            if self.init == "vocab":
                ids = torch.randint(0, weight.shape[0], (self.num_virtual_tokens,))
            else:
                ids = torch.tensor(self.text_ids())
            init = weight.detach()[ids.to(weight.device)].clone()
        return PromptEmbedding(self.num_virtual_tokens, edit.site.out_features, init,
                               device=weight.device, dtype=weight.dtype)


class PromptEmbedding(VirtualSource):
    """``forward() = P`` — the N virtual-token embeddings, ``prompt_embeddings`` ∈ ℝ^{N×d}."""

    def __init__(self, num_virtual_tokens: int, dim: int, init: torch.Tensor | None = None, device=None,
                 dtype=None):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(torch.empty(num_virtual_tokens, dim, device=device, dtype=dtype))
        if init is not None:
            with torch.no_grad():
                self.prompt_embeddings.copy_(init)
        elif self.prompt_embeddings.device.type != "meta":
            nn.init.normal_(self.prompt_embeddings)

    def forward(self) -> torch.Tensor:
        return self.prompt_embeddings
