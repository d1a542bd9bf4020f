"""Trainable tokens — Hugging Face PEFT's ``TrainableTokensConfig`` / LoRA's ``trainable_token_indices``: only the
given rows of the token embedding train (new or re-purposed tokens), the rest of the table stays frozen.

    E'[i] = δ[pos(i)] for i in the index list,  E'[i] = E[i] otherwise;   y = E'[ids]

``δ`` (parameter ``token_delta``, ``[n, dim]``) starts as a copy of the selected rows, so an untrained adapter is
the identity: n·dim trainable values. The embedding's output rows whose id is selected are replaced by the matching
row of δ (``where(selected, δ[pos(ids)], y)``: the same values as HF's ``index_copy`` of the table, without copying
the table). When the LM head is tied to the embedding (one tensor read by both, ``tie_word_embeddings``), HF PEFT
wraps the head too and it shares δ: the head's logits for the selected tokens become x·δᵀ. peftfx does the same:
every linear site that reads the embedding's tensor gets a :class:`TokenColumns` holding a reference to the
embedding's δ (no parameter of its own; one δ in the state dict and the trainable count, as HF).

Merging writes δ into the table's rows (and, tied, into the head's rows: the merge pass gives each site its own copy
of a shared weight, and both get the rows); unmerging restores the rows saved at merge. A Hugging Face folder stores
δ as ``base_model.model.<embedding path>.token_adapter.trainable_tokens_delta`` with the indices in the LoRA config's
``trainable_token_indices``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import RuleError
from .._util import call_reading
from ..rules import Selector, select
from .base import AdapterModule, MethodConfig, register_method

__all__ = ["TokenColumns", "TokenRows", "TrainableTokens"]

_TIED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


@register_method
@dataclass(frozen=True)
class TrainableTokens(MethodConfig):
    """``token_indices``: the embedding rows that train; ``targets``: the token embedding (default role ``embed``).
    ``tied`` (default True): linear sites reading the same tensor (a tied LM head) use the trained rows too."""

    token_indices: tuple[int, ...] = ()
    targets: Selector | None = None
    tied: bool = True

    name: ClassVar[str] = "trainable_tokens"
    site_kinds: ClassVar[frozenset[str]] = frozenset({"embedding", "linear"})

    def validate(self) -> None:
        idx = self.token_indices
        if not idx or any(i < 0 for i in idx):
            raise RuleError(f"TrainableTokens token_indices must be a non-empty list of token ids ≥ 0, got {list(idx)!r}")
        if len(set(idx)) != len(idx):
            raise RuleError(f"TrainableTokens token_indices has duplicates: {list(idx)!r}")
        if self.modules_to_save or self.trainable_token_indices:
            raise RuleError("TrainableTokens takes token_indices=..., not modules_to_save/trainable_token_indices")

    def default_targets(self) -> Selector:
        return select.role("embed")

    @classmethod
    def conformance_example(cls) -> TrainableTokens:
        """The config ``tests/test_conformance.py`` applies (the default has no indices)."""
        return cls(token_indices=tuple(range(0, 64, 3)))

    @property
    def selector(self) -> Selector:
        base = super().selector
        return base | select.role("head") if self.tied else base

    def decline(self, site) -> str | None:
        if site.kind == "embedding":
            if max(self.token_indices) >= site.weight_shape[0]:
                return (f"token index {max(self.token_indices)} is outside this embedding's "
                        f"{site.weight_shape[0]} rows")
            return None
        if not self.tied or _embedding_of(site) is None:
            return "a linear site takes trainable tokens only when it reads a token embedding's table (a tied LM head)"
        return None

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> AdapterModule:
        gm = site.node.graph.owning_module
        shared = _TIED.setdefault(gm, {}) if gm is not None else {}
        key = (id(self), id(weight))
        if site.kind == "embedding":
            module = TokenRows(self.token_indices, weight)
            shared[key] = module
            return module
        owner = shared.get(key)
        if owner is None:
            raise RuleError(f"trainable tokens on {site.key}: it reads the embedding table {site.weight} but the "
                            "embedding itself is not selected; select the token embedding too (or tied=False).")
        return TokenColumns(owner)


def _embedding_of(site) -> object | None:
    """An ``aten.embedding`` node reading the same tensor as this linear site, or None."""
    gm = site.node.graph.owning_module
    if gm is None:
        return None
    try:
        w = gm.get_parameter(site.weight)
    except AttributeError:
        return None
    return call_reading(gm, torch.ops.aten.embedding.default, w, 0)


class TokenRows(AdapterModule):
    """The embedding side: output rows of the selected ids come from ``token_delta``."""

    position: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = True

    def __init__(self, indices: tuple[int, ...], weight: torch.Tensor):
        super().__init__()
        idx = torch.tensor(indices, dtype=torch.long, device=weight.device)
        pos = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        pos[idx] = torch.arange(len(indices), device=weight.device)
        self.register_buffer("token_indices", idx, persistent=False)
        self.register_buffer("token_pos", pos, persistent=False)
        self.token_delta = nn.Parameter(weight.detach()[idx].clone())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.token_pos[x]
        rows = F.embedding(p.clamp(min=0), self.token_delta).to(y.dtype)
        return torch.where((p >= 0).unsqueeze(-1), rows, y)

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        table = weight.t()                     # the canonical view of an embedding is [dim, vocab]
        self.__dict__["_originals"] = table[self.token_indices].clone()
        table[self.token_indices] = self.token_delta.to(table.dtype)

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        saved = self.__dict__.pop("_originals", None)
        if saved is None:
            raise RuleError("trainable tokens: these rows were not merged here; unmerge the model merge() returned.")
        weight.t()[self.token_indices] = saved


class TokenColumns(AdapterModule):
    """The tied LM head side: logits of the selected tokens are x·δᵀ (+ their bias), δ shared with the embedding."""

    position: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = True
    reads_weight: ClassVar[bool] = True

    def __init__(self, owner: TokenRows):
        super().__init__()
        self._owner = [owner]          # a reference, not a submodule: δ is the embedding's (one copy, one key)

    @property
    def owner(self) -> TokenRows:
        return self._owner[0]

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        o = self.owner
        cols = F.linear(x, o.token_delta.to(x.dtype), None if b is None else b[o.token_indices]).to(y.dtype)
        return y.index_copy(y.dim() - 1, o.token_indices, cols)

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        o = self.owner
        self.__dict__["_originals"] = weight[o.token_indices].clone()
        weight[o.token_indices] = o.token_delta.to(weight.dtype)

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        saved = self.__dict__.pop("_originals", None)
        if saved is None:
            raise RuleError("trainable tokens: these rows were not merged here; unmerge the model merge() returned.")
        weight[self.owner.token_indices] = saved
