"""Hugging Face PEFT ``TRAINABLE_TOKENS`` folders (``TrainableTokensConfig``) ⇄ :class:`~peftfx.TrainableTokens`.

HF stores δ as ``base_model.model.<embedding>.trainable_tokens_delta`` and, for a tied LM head, the same values again
under ``base_model.model.<head>.trainable_tokens_delta``; peftfx holds one δ (the head shares the embedding's), reads
the embedding's key and checks that a tied head's copy is equal. (Trainable tokens beside LoRA — LoRA's
``trainable_token_indices`` — are :mod:`peftfx.io.hf_aux`.)
"""
from __future__ import annotations

from typing import Any

import torch

from .._errors import CheckpointError
from ..model import AdapterRecord, PeftModel
from ..rules import select
from ._hf import HINTS, PREFIX, Imported, check_fields, register_converter

_KEY = "trainable_tokens_delta"


@register_converter
class TrainableTokensConverter:
    peft_type = "TRAINABLE_TOKENS"
    methods = ("trainable_tokens",)
    honoured = frozenset({"target_modules", "token_indices", "init_weights"})

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        from .trainable_tokens import TrainableTokens

        check_fields(config, TrainableTokensConverter.honoured, HINTS)
        idx = config.get("token_indices")
        if not isinstance(idx, list) or not idx:
            raise CheckpointError(f"token_indices must be a non-empty list of token ids, got {idx!r}")
        tm = config.get("target_modules")
        names = [tm] if isinstance(tm, str) else list(tm or [])
        targets = select.name(*names) if names else None
        keys = [k for k in tensors if k.endswith("." + _KEY)]
        return Imported([TrainableTokens(token_indices=tuple(idx), targets=targets)],
                        lambda rec, pname: f"{PREFIX}{rec.site['path']}.{_KEY}", set(keys))

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rules = model.peft_info.rules
        embeds = [r for r in records if r.site.get("kind") == "embedding"]
        if len(embeds) != 1 or len({r.rule_index for r in records}) != 1:
            raise CheckpointError("an HF TRAINABLE_TOKENS folder holds one embedding's token rows; this model has "
                                  f"{len(embeds)}. Save in the peftfx format instead.")
        emb = embeds[0]
        delta = model.get_submodule(emb.name).token_delta
        tensors = {f"{PREFIX}{r.site['path']}.{_KEY}": delta.detach().clone() for r in records}  # tied: same rows
        fields = {"target_modules": emb.site["path"], "init_weights": True,
                  "token_indices": [int(i) for i in rules[emb.rule_index].token_indices]}
        return fields, tensors
