"""Hugging Face PEFT ``PREFIX_TUNING`` folders ⇄ :class:`~peftfx.PrefixTuning` (see :mod:`._hf`)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from .._errors import CheckpointError
from ..model import AdapterRecord, PeftModel
from ._hf import KEY, Imported, check_virtual, folded_tokens, register_converter, virtual_common
from .prefix import PrefixTuning

log = logging.getLogger(__name__)

@register_converter
class PrefixTuningConverter:
    """``PREFIX_TUNING`` ⇄ :class:`~peftfx.methods.prefix.PrefixTuning` (``prompt_embeddings``
    ``[N, L·2·Dkv]``, the same layout). A projected prefix is stored (and loaded) as its MLP's output."""

    peft_type = "PREFIX_TUNING"
    methods = ("prefix",)
    honoured = frozenset({"prefix_projection", "encoder_hidden_size"})

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        n = check_virtual(config, PrefixTuningConverter.honoured)
        return Imported([PrefixTuning(num_virtual_tokens=n)], lambda rec, pname: KEY)

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rule = model.peft_info.rules[records[0].rule_index]
        if not rule.position_offset:
            raise CheckpointError("position_offset=False keeps the real tokens at positions 0…S-1; HF PEFT's "
                                  "prefix always shifts them by N. Save in the peftfx format instead.")
        table = folded_tokens(model, records)
        fields = {"prefix_projection": bool(rule.projection), "encoder_hidden_size": rule.encoder_hidden_size}
        return {**virtual_common(model, table), **fields}, {KEY: table}
