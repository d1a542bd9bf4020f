"""The converter table for Hugging Face PEFT folders: one registered class per ``peft_type``.

Each converter reads an HF config into peftfx rules (``target_modules`` names become name selectors,
``layers_to_transform`` a layer selector, ``exclude_modules`` a negated one) and names the HF tensor of each
adapter parameter; writing goes the other way with exact module paths as ``target_modules``.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from .._errors import CheckpointError
from ..graph import AdapterRecord, PeftModel
from ..rules import Selector, select
from .hf import PREFIX, Imported, check_fields, module_path, register_converter

__all__ = ["LoRAConverter", "IA3Converter", "VeRAConverter", "HINTS"]

HINTS = {
    "modules_to_save": "HF PEFT trains and saves full copies of these modules (e.g. a classification head); "
                       "peftfx has no such method",
    "bias": "HF PEFT trains the base biases too; peftfx keeps every base parameter frozen",
    "lora_bias": "a bias on LoRA's B is not supported",
    "layer_replication": "peftfx does not replicate layers",
    "target_parameters": "LoRA on bare nn.Parameter targets (MoE experts) is not supported",
    "trainable_token_indices": "trainable token rows are not supported",
    "use_qalora": "QA-LoRA pools the input; not supported",
    "megatron_config": "Megatron parallel layers are not supported",
}

_MODULE_TYPES = ("Linear", "Conv1D", "Embedding")


def _adapter_paths(tensors: dict[str, torch.Tensor], marker: str) -> list[str]:
    """Module paths of the keys ``base_model.model.<path>.<marker>…``, in file order."""
    out = [k[len(PREFIX):].split("." + marker, 1)[0] for k in tensors
           if k.startswith(PREFIX) and ("." + marker) in k]
    return list(dict.fromkeys(out))


def _targets(config: dict[str, Any], paths: list[str]) -> Selector:
    """HF's module matching as a selector: a list of names matches a module equal to a name or ending in
    ``.name``; a string is a full-match regex; ``all-linear`` is whatever the file holds."""
    tm = config.get("target_modules")
    if tm is None or tm == "all-linear":
        sel = select.name(*paths)
    elif isinstance(tm, str):
        sel = select.regex(tm)
    else:
        sel = select.name(*tm)
        layers = config.get("layers_to_transform")
        if layers is not None and layers != []:          # HF applies layers only to list targets
            layers = [layers] if isinstance(layers, int) else list(layers)
            pattern = config.get("layers_pattern")
            if pattern:
                pats = [pattern] if isinstance(pattern, str) else list(pattern)
                sel = sel & select.regex(rf"(?:.*?\.)?(?:{'|'.join(pats)})\.(?:{'|'.join(map(str, layers))})\..*")
            else:
                sel = sel & select.layer(layers)
    ex = config.get("exclude_modules")
    if ex:
        sel = sel & ~(select.regex(ex) if isinstance(ex, str) else select.name(*ex))
    return sel


def _pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """HF's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)``."""
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", path):
            return v
    return default


def _records_of(model: PeftModel, records: list[AdapterRecord]) -> list[tuple[AdapterRecord, Any, str]]:
    out = []
    for rec in records:
        path = module_path(rec)
        if rec.site.get("module_type") not in _MODULE_TYPES:
            raise CheckpointError(
                f"adapter {rec.name} sits on a {rec.site.get('module_type')!r} module; Hugging Face PEFT adapts "
                f"{', '.join(_MODULE_TYPES)} modules only. Save in the peftfx format instead.")
        out.append((rec, model.get_submodule(rec.name), path))
    return out


# ------------------------------------------------------------------------------------------- LoRA / DoRA
_LORA_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_embedding_A": "lora_embedding_A",
              "lora_embedding_B": "lora_embedding_B", "dora_magnitude": "lora_magnitude_vector"}
_SAFE_INITS = ("gaussian", "eva", "orthogonal")       # these leave W₀ as it is (B·A = 0 at init)


@register_converter
class LoRAConverter:
    """``LORA`` ⇄ :class:`~peftfx.LoRA` (or :class:`~peftfx.DoRA` with ``use_dora``). ``rank_pattern`` and
    ``alpha_pattern`` become one rule per (rank, alpha) group; ``fan_in_fan_out`` needs no translation
    (sites see every weight as ``[out, in]``)."""

    peft_type = "LORA"
    methods = ("lora", "dora")
    honoured = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                          "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora",
                          "use_dora", "fan_in_fan_out", "init_lora_weights",
                          # inert unless another field switches them on (and that field is checked)
                          "qalora_group_size", "megatron_core", "loftq_config", "corda_config", "eva_config",
                          "lora_ga_config"})

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        from ..methods.dora import DoRA
        from ..methods.lora import LoRA

        check_fields(config, LoRAConverter.honoured, HINTS)
        init = config.get("init_lora_weights", True)
        if not (init is True or init is False or init in _SAFE_INITS):
            raise CheckpointError(
                f"init_lora_weights={init!r}: this initialisation rewrites the base weights (PiSSA, OLoRA, "
                "LoftQ, CorDA, LoRA-GA, MiCA), so the adapter fits only that changed base. Convert it to a plain "
                "LoRA with the peft package first (save_pretrained(..., path_initial_model_for_weight_"
                "conversion=...)).")
        cls = DoRA if config.get("use_dora") else LoRA
        r, alpha = int(config.get("r", 8)), config.get("lora_alpha", 8)
        paths = _adapter_paths(tensors, "lora_")
        groups: dict[tuple[int, Any], list[str]] = {}
        for p in paths:
            key = (int(_pattern_value(config.get("rank_pattern"), p, r)),
                   _pattern_value(config.get("alpha_pattern"), p, alpha))
            groups.setdefault(key, []).append(p)
        common = dict(dropout=float(config.get("lora_dropout", 0.0)), rslora=bool(config.get("use_rslora")))
        base = _targets(config, paths)
        others = [p for g, ps in groups.items() if g != (r, alpha) for p in ps]
        rules = []
        if not others or (r, alpha) in groups:
            rules.append(cls(rank=r, alpha=alpha, targets=base & ~select.name(*others) if others else base,
                             **common))
        rules += [cls(rank=g[0], alpha=g[1], targets=select.name(*ps), **common)
                  for g, ps in groups.items() if g != (r, alpha)]
        return Imported(rules, lambda rec, pname: f"{PREFIX}{module_path(rec)}.{_LORA_KEYS.get(pname, pname)}")

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rules = model.peft_info.rules
        methods = {rec.method for rec in records}
        dropouts = {float(rules[rec.rule_index].dropout) for rec in records}
        if len(methods) > 1 or len(dropouts) > 1:
            raise CheckpointError(
                f"one HF LORA folder has one use_dora and one lora_dropout, but this model mixes methods "
                f"{sorted(methods)} / dropouts {sorted(dropouts)}. Save in the peftfx format instead.")
        entries, tensors = [], {}
        for rec, mod, path in _records_of(model, records):
            if getattr(mod, "spans", None) not in (None, [(0, getattr(mod, "out_features", None))]):
                raise CheckpointError(f"adapter {rec.name} uses fused='split' (one LoRA pair per q/k/v slice); "
                                      "HF PEFT has no such form. Use fused='joint' to save in the HF format.")
            for pname, p in mod.named_parameters():
                tensors[f"{PREFIX}{path}.{_LORA_KEYS[pname]}"] = p
            rank = (mod.lora_A if hasattr(mod, "lora_A") else mod.lora_embedding_A).shape[0]
            entries.append((path, rank, float(mod.scaling), rules[rec.rule_index]))
        (r, rslora, alpha), _ = Counter((e[1], e[3].rslora, e[3].alpha) for e in entries).most_common(1)[0]
        rank_pattern, alpha_pattern = {}, {}
        for path, rank, scaling, _rule in entries:
            if rank != r:
                rank_pattern[re.escape(path)] = rank
            need = scaling * (rank ** 0.5 if rslora else rank)      # the alpha that gives this scaling
            if abs(need - alpha) > 1e-9 * max(1.0, abs(alpha)):
                alpha_pattern[re.escape(path)] = need
        fields = {"r": r, "lora_alpha": alpha, "lora_dropout": dropouts.pop(), "use_rslora": rslora,
                  "use_dora": methods.pop() == "dora", "target_modules": sorted({e[0] for e in entries}),
                  "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none",
                  "fan_in_fan_out": any(rec.site.get("module_type") == "Conv1D" for rec in records),
                  "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
                  "layers_pattern": None}
        return fields, tensors


# ------------------------------------------------------------------------------------------- IA3
@register_converter
class IA3Converter:
    """``IA3`` ⇄ :class:`~peftfx.IA3`. HF stores ``ia3_l`` as ``[out, 1]`` (output scaling) or ``[1, in]``
    (``feedforward_modules``: input scaling); peftfx as a vector. ``feedforward_modules`` is resolved the way
    HF does (a module path ending in a name, or a full-match regex) over the modules in the file."""

    peft_type = "IA3"
    methods = ("ia3",)
    honoured = frozenset({"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                          "init_ia3_weights"})

    @staticmethod
    def read(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
        from ..methods.ia3 import IA3

        check_fields(config, IA3Converter.honoured, HINTS)
        paths = _adapter_paths(tensors, "ia3_l")
        ff = config.get("feedforward_modules") or []
        if isinstance(ff, str):
            ff_paths = [p for p in paths if re.fullmatch(ff, p)]
        else:
            ff_paths = [p for p in paths if any(p.endswith(k) for k in ff)]
        feedforward = select.name(*ff_paths) if ff_paths else ~select.all()
        rule = IA3(targets=_targets(config, paths), feedforward=feedforward)
        return Imported([rule], lambda rec, pname: f"{PREFIX}{module_path(rec)}.{pname}")

    @staticmethod
    def write(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors, targets, feedforward = {}, set(), set()
        for rec, mod, path in _records_of(model, records):
            if mod.position == "input":
                tensors[f"{PREFIX}{path}.ia3_l"] = mod.ia3_l.reshape(1, -1)
                feedforward.add(path)
            else:
                if mod.spans != [(0, mod.out_features)]:
                    raise CheckpointError(
                        f"adapter {rec.name} scales only the {mod.spans} rows of a fused projection; HF PEFT "
                        "scales whole modules. Select the projection by name to save in the HF format.")
                tensors[f"{PREFIX}{path}.ia3_l"] = mod.ia3_l.reshape(-1, 1)
            targets.add(path)
        fields = {"target_modules": sorted(targets), "feedforward_modules": sorted(feedforward),
                  "fan_in_fan_out": any(rec.site.get("module_type") == "Conv1D" for rec in records),
                  "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None}
        return fields, tensors


# ------------------------------------------------------------------------------------------- VeRA
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
        from ..methods.vera import VeRA

        check_fields(config, VeRAConverter.honoured, HINTS)
        rule = VeRA(rank=int(config.get("r", 256)), dropout=float(config.get("vera_dropout", 0.0)),
                    d_initial=float(config.get("d_initial", 0.1)),
                    projection_prng_key=int(config.get("projection_prng_key", 0)),
                    targets=_targets(config, _adapter_paths(tensors, "vera_lambda_")))
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
        for rec, mod, path in _records_of(model, records):
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

