"""Hugging Face PEFT ``P_TUNING`` folders ⇄ :class:`~peftfx.PTuning` (loaded as the encoder's output table; see :mod:`._hf`)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..model import AdapterRecord, PeftModel
from ._hf import KEY, Imported, check_virtual, folded_tokens, register_converter, virtual_common
from .prompt import PromptTuning

log = logging.getLogger(__name__)

@register_converter
class PTuningConverter:
    """``P_TUNING`` ⇄ :class:`~peftfx.methods.ptuning.PTuning`. The file holds the encoder's output, so it
    loads as prompt tuning over those embeddings (the same outputs)."""

    peft_type = "P_TUNING"
    methods = ("ptuning",)
    honoured = frozenset({"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
                          "encoder_dropout"})       # describe an encoder whose output is all the file holds

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        n = check_virtual(config, PTuningConverter.honoured)
        log.info("HF P_TUNING folders hold the prompt encoder's output; loading it as prompt tuning")
        return Imported([PromptTuning(num_virtual_tokens=n)], lambda rec, pname: KEY)

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rule = model.peft_info.rules[records[0].rule_index]
        table = folded_tokens(model, records)
        fields = {"encoder_reparameterization_type": rule.encoder.upper(),
                  "encoder_hidden_size": rule.encoder_hidden_size or table.shape[1],
                  "encoder_num_layers": rule.encoder_num_layers, "encoder_dropout": float(rule.encoder_dropout)}
        return {**virtual_common(model, table), **fields}, {KEY: table}
