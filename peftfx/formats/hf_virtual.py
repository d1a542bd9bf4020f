"""Converters for Hugging Face PEFT's virtual-token methods: prompt tuning, p-tuning, prefix tuning.

HF PEFT saves these as one tensor, ``prompt_embeddings``: the virtual-token embeddings ``[N, d]`` (prompt tuning,
p-tuning) or the key/value prefixes ``[N, L·2·Dkv]`` (prefix tuning) — for p-tuning and projected prefixes the
*output* of the prompt encoder, which HF PEFT loads (inference mode, its default) as a plain table and no longer
runs the encoder. So an HF P_TUNING folder loads as :class:`~peftfx.methods.prompt.PromptTuning` holding that
output, and a projected PREFIX_TUNING folder as an unprojected :class:`~peftfx.methods.prefix.PrefixTuning`:
outputs are identical, the encoder weights were never in the file. Writing goes the same way: the peftfx
encoder is evaluated and its output saved, as HF PEFT's own ``save_pretrained`` does.

Outputs: HF PEFT returns N + S logits for a causal LM where peftfx returns the S real ones. Written folders say
``task_type`` CAUSAL_LM for ``…ForCausalLM`` models, FEATURE_EXTRACTION otherwise (HF's SEQ_CLS/TOKEN_CLS
wrappers would expect a trained copy of the head in the file); ``num_layers``, ``token_dim`` and
``num_attention_heads`` are left for HF PEFT to fill from the model's config, as it does for its own configs.
Encoder-decoder models (``num_transformer_submodules`` 2) are refused.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from .._errors import CheckpointError
from ..graph import AdapterRecord, PeftModel
from .hf import Imported, check_fields, register_converter
from .hf_methods import HINTS

__all__ = ["PromptTuningConverter", "PTuningConverter", "PrefixTuningConverter"]

log = logging.getLogger(__name__)

KEY = "prompt_embeddings"
#: present in every prompt-learning config; sizes HF fills from the model, or the init of values the file holds
_SHAPE_FIELDS = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                           "num_layers"})


def _check(config: dict[str, Any], honoured: frozenset[str]) -> int:
    check_fields(config, _SHAPE_FIELDS | honoured, HINTS)
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(f"num_transformer_submodules={config['num_transformer_submodules']!r}: virtual "
                              "tokens for both encoder and decoder (encoder-decoder models) are not supported.")
    return int(config["num_virtual_tokens"])


def _folded(model: PeftModel, records: list[AdapterRecord]) -> torch.Tensor:
    """The virtual-token tensor the one adapter produces (its encoder evaluated in eval mode)."""
    if len(records) != 1:
        raise CheckpointError(f"expected one virtual-token adapter, found {len(records)}.")
    module = model.get_submodule(records[0].name)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module().detach()
    finally:
        module.train(was)


def _task(model: PeftModel) -> str:
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else "FEATURE_EXTRACTION"


def _common(model: PeftModel, table: torch.Tensor) -> dict[str, Any]:
    return {"num_virtual_tokens": table.shape[0], "num_transformer_submodules": 1, "token_dim": None,
            "num_layers": None, "num_attention_heads": None, "task_type": _task(model), "modules_to_save": None}


@register_converter
class PromptTuningConverter:
    """``PROMPT_TUNING`` ⇄ :class:`~peftfx.methods.prompt.PromptTuning` (``prompt_embeddings`` ``[N, d]``)."""

    peft_type = "PROMPT_TUNING"
    methods = ("prompt",)
    honoured = frozenset({"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                          "tokenizer_kwargs"})        # init only: the file holds the trained values

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        from ..methods.prompt import PromptTuning

        n = _check(config, PromptTuningConverter.honoured)
        return Imported([PromptTuning(num_virtual_tokens=n)], lambda rec, pname: KEY)

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        table = _folded(model, records)
        return {**_common(model, table), "prompt_tuning_init": "RANDOM"}, {KEY: table}


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
        from ..methods.prompt import PromptTuning

        n = _check(config, PTuningConverter.honoured)
        log.info("HF P_TUNING folders hold the prompt encoder's output; loading it as prompt tuning")
        return Imported([PromptTuning(num_virtual_tokens=n)], lambda rec, pname: KEY)

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rule = model.peft_info.rules[records[0].rule_index]
        table = _folded(model, records)
        fields = {"encoder_reparameterization_type": rule.encoder.upper(),
                  "encoder_hidden_size": rule.encoder_hidden_size or table.shape[1],
                  "encoder_num_layers": rule.encoder_num_layers, "encoder_dropout": float(rule.encoder_dropout)}
        return {**_common(model, table), **fields}, {KEY: table}


@register_converter
class PrefixTuningConverter:
    """``PREFIX_TUNING`` ⇄ :class:`~peftfx.methods.prefix.PrefixTuning` (``prompt_embeddings``
    ``[N, L·2·Dkv]``, the same layout). A projected prefix is stored (and loaded) as its MLP's output."""

    peft_type = "PREFIX_TUNING"
    methods = ("prefix",)
    honoured = frozenset({"prefix_projection", "encoder_hidden_size"})

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        from ..methods.prefix import PrefixTuning

        n = _check(config, PrefixTuningConverter.honoured)
        return Imported([PrefixTuning(num_virtual_tokens=n)], lambda rec, pname: KEY)

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rule = model.peft_info.rules[records[0].rule_index]
        if not rule.position_offset:
            raise CheckpointError("position_offset=False keeps the real tokens at positions 0…S-1; HF PEFT's "
                                  "prefix always shifts them by N. Save in the peftfx format instead.")
        table = _folded(model, records)
        fields = {"prefix_projection": bool(rule.projection), "encoder_hidden_size": rule.encoder_hidden_size}
        return {**_common(model, table), **fields}, {KEY: table}
