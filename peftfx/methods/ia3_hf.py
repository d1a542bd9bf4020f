"""Hugging Face PEFT ``IA3`` folders ⇄ :class:`~peftfx.IA3` (see :mod:`._hf`)."""
from __future__ import annotations

from typing import Any

import torch

from .._errors import CheckpointError
from .._saferegex import compile_safe
from ..model import AdapterRecord, PeftModel
from ..rules import select
from ._hf import (HINTS, PREFIX, Imported, adapter_paths, check_fields, hf_shape, hf_targets, module_path,
                  records_of, register_converter)

#: module classes HF PEFT's IA3 adapts (not Conv1d, not MultiheadAttention)
_IA3_TYPES = ("Linear", "Conv1D", "Conv2d", "Conv3d")


@register_converter
class IA3Converter:
    """``IA3`` ⇄ :class:`~peftfx.IA3`. HF stores ``ia3_l`` as ``[out, 1]`` (output scaling) or ``[1, in]``
    (``feedforward_modules``: input scaling), ``[1, C, 1, …]`` on a convolution; peftfx as a vector. ``feedforward_modules`` is resolved the way
    HF does (a module path ending in a name, or a full-match regex) over the modules in the file."""

    peft_type = "IA3"
    methods = ("ia3",)
    honoured = frozenset({"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                          "init_ia3_weights"})

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        from ..methods.ia3 import IA3

        check_fields(config, IA3Converter.honoured, HINTS)
        paths = adapter_paths(tensors, "ia3_l")
        ff = config.get("feedforward_modules") or []
        if isinstance(ff, str):
            ff_paths = [p for p in paths if compile_safe(ff).fullmatch(p)]    # linear time: cannot hang
        else:
            ff_paths = [p for p in paths if any(p.endswith(k) for k in ff)]
        feedforward = select.name(*ff_paths) if ff_paths else ~select.all()
        rule = IA3(targets=hf_targets(config, paths), feedforward=feedforward)
        return Imported([rule], lambda rec, pname: f"{PREFIX}{module_path(rec)}.{pname}")

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors, targets, feedforward = {}, set(), set()
        for rec, mod, path in records_of(model, records, _IA3_TYPES, "'s IA3"):
            if mod.position == "input":
                feedforward.add(path)
            elif mod.spans != [(0, mod.out_features)]:
                raise CheckpointError(
                    f"adapter {rec.name} scales only the {mod.spans} rows of a fused projection; HF PEFT "
                    "scales whole modules. Select the projection by name to save in the HF format.")
            tensors[f"{PREFIX}{path}.ia3_l"] = hf_shape(rec, mod.ia3_l, mod.position)
            targets.add(path)
        fields = {"target_modules": sorted(targets), "feedforward_modules": sorted(feedforward),
                  "fan_in_fan_out": any(rec.site.get("module_type") == "Conv1D" for rec in records),
                  "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None}
        return fields, tensors
