"""Hugging Face PEFT ``VERA`` folders ⇄ :class:`~peftfx.VeRA` (see :mod:`._hf`)."""
from __future__ import annotations

from typing import Any

import torch

from .._errors import CheckpointError
from ..model import AdapterRecord, PeftModel
from ._hf import (HINTS, PREFIX, Imported, adapter_paths, check_fields, hf_targets, module_path, records_of,
                  register_converter)
from .vera import VeRA

@register_converter
class VeRAConverter:
    """``VERA`` ⇄ :class:`~peftfx.VeRA`. The shared A/B are regenerated from ``projection_prng_key``; when the
    folder stores them (``save_projection``) the stored values are used, as HF PEFT does."""

    peft_type = "VERA"
    methods = ("vera",)
    honoured = frozenset({"r", "target_modules", "layers_to_transform", "layers_pattern", "projection_prng_key",
                          "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out", "init_weights"})
    shared = ("base_model.vera_A", "base_model.vera_B")

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        check_fields(config, VeRAConverter.honoured, HINTS)
        rule = VeRA(rank=int(config.get("r", 256)), dropout=float(config.get("vera_dropout", 0.0)),
                    d_initial=float(config.get("d_initial", 0.1)),
                    projection_prng_key=int(config.get("projection_prng_key", 0)),
                    targets=hf_targets(config, adapter_paths(tensors, "vera_lambda_")))
        stored = [k for k in VeRAConverter.shared if k in tensors]

        def finish(modules) -> None:
            if not stored:
                return
            proj = next(iter(modules.values())).projection
            for key, buf in zip(VeRAConverter.shared, (proj.vera_A, proj.vera_B)):
                if key in tensors and tuple(tensors[key].shape) != tuple(buf.shape):
                    raise CheckpointError(f"{key} has shape {tuple(tensors[key].shape)}, but the rule's sites "
                                          f"need {tuple(buf.shape)}; the adapter was made for another model.")
                buf.copy_(tensors[key].to(buf.dtype))

        return Imported([rule], lambda rec, pname: f"{PREFIX}{module_path(rec)}.{pname}", set(stored), finish)

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rules = {rec.rule_index for rec in records}
        if len(rules) > 1:
            raise CheckpointError("an HF VERA folder holds one rule (one rank, one shared projection); this model "
                                  f"has {len(rules)} VeRA rules. Save in the peftfx format instead.")
        rule = model.peft_info.rules[rules.pop()]
        tensors = {}
        for rec, mod, path in records_of(model, records, ("Linear", "Conv1D"), "'s VeRA"):
            for pname, p in mod.named_parameters():
                tensors[f"{PREFIX}{path}.{pname}"] = p
        proj = model.get_submodule(records[0].name).projection
        tensors.update(zip(VeRAConverter.shared, (proj.vera_A, proj.vera_B)))
        fields = {"r": rule.rank, "target_modules": sorted({module_path(rec) for rec in records}),
                  "projection_prng_key": rule.projection_prng_key, "save_projection": True,
                  "vera_dropout": rule.dropout, "d_initial": rule.d_initial, "bias": "none",
                  "fan_in_fan_out": any(rec.site.get("module_type") == "Conv1D" for rec in records),
                  "init_weights": True, "modules_to_save": None, "layers_to_transform": None,
                  "layers_pattern": None}
        return fields, tensors
