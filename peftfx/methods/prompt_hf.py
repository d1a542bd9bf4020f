"""Hugging Face PEFT ``PROMPT_TUNING`` folders ⇄ :class:`~peftfx.PromptTuning` (see :mod:`._hf`)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..model import AdapterRecord, PeftModel
from ._hf import KEY, Imported, check_virtual, folded_tokens, register_converter, virtual_common
from .prompt import PromptTuning

log = logging.getLogger(__name__)

@register_converter
class PromptTuningConverter:
    """``PROMPT_TUNING`` ⇄ :class:`~peftfx.methods.prompt.PromptTuning` (``prompt_embeddings`` ``[N, d]``)."""

    peft_type = "PROMPT_TUNING"
    methods = ("prompt",)
    honoured = frozenset({"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                          "tokenizer_kwargs"})        # init only: the file holds the trained values

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        n = check_virtual(config, PromptTuningConverter.honoured)
        return Imported([PromptTuning(num_virtual_tokens=n)], lambda rec, pname: KEY)

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        table = folded_tokens(model, records)
        return {**virtual_common(model, table), "prompt_tuning_init": "RANDOM"}, {KEY: table}
