"""Hugging Face PEFT ``LORA`` folders ⇄ :class:`~peftfx.LoRA` / :class:`~peftfx.DoRA` (see :mod:`._hf`)."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from .._errors import CheckpointError
from .._saferegex import compile_safe
from ..model import AdapterRecord, PeftModel
from ..rules import select
from ._hf import (HINTS, PREFIX, Imported, adapter_paths, check_fields, hf_targets, is_mha_out_proj,
                  mha_out_proj_paths, module_path, pattern_value, records_of, register_converter)

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
                          "use_dora", "fan_in_fan_out", "init_lora_weights", "target_parameters",
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
        hf_paths, experts = _split_parameter_paths(config, adapter_paths(tensors, "lora_"))
        mha_out = mha_out_proj_paths(hf_paths)    # HF adapted these MultiheadAttentions whole: their out_proj too
        paths = [mha_out[p][0] if p in mha_out else p for p in hf_paths]
        groups: dict[tuple[int, Any], list[str]] = {}
        for p, hp in zip(paths, hf_paths):
            src = mha_out[hp][1] if hp in mha_out else p
            key = (int(pattern_value(config.get("rank_pattern"), src, r)),
                   pattern_value(config.get("alpha_pattern"), src, alpha))
            groups.setdefault(key, []).append(p)
        common = dict(dropout=float(config.get("lora_dropout", 0.0)), rslora=bool(config.get("use_rslora")))
        rules = _module_rules(cls, config, r, alpha, paths, mha_out, groups, common) if hf_paths else []
        if experts:
            rules.append(cls(rank=r, alpha=alpha, targets=select.type("experts")
                             & select.name(*config["target_parameters"]), **common))

        def hf_key(rec, pname):
            if rec.site.get("kind") == "experts":
                return experts_key(rec, config["target_parameters"], _LORA_KEYS[pname])
            return f"{PREFIX}{module_path(rec)}.{_LORA_KEYS.get(pname, pname)}"
        return Imported(rules, hf_key)

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
        params, records = write_experts(model, records, tensors)
        for rec, mod, path in records_of(model, records):
            if getattr(mod, "spans", None) not in (None, [(0, getattr(mod, "out_features", None))]):
                raise CheckpointError(f"adapter {rec.name} uses fused='split' (one LoRA pair per q/k/v slice); "
                                      "HF PEFT has no such form. Use fused='joint' to save in the HF format.")
            if rec.method == "dora" and rec.site.get("module_type") == "MultiheadAttention":
                raise CheckpointError(f"adapter {rec.name} is DoRA on a MultiheadAttention; HF PEFT refuses DoRA "
                                      "there. Save in the peftfx format instead.")
            for pname, p in mod.named_parameters():
                tensors[f"{PREFIX}{path}.{_LORA_KEYS[pname]}"] = p
            rank = (mod.lora_A if hasattr(mod, "lora_A") else mod.lora_embedding_A).shape[0]
            entries.append((path, rank, float(mod.scaling), rules[rec.rule_index]))
        _check_mha_pairs(records, {e[0]: e[1:3] for e in entries})
        (r, rslora, alpha), _ = Counter((e[1], e[3].rslora, e[3].alpha) for e in entries + params).most_common(1)[0]
        _check_experts_uniform(params, r, rslora, alpha)
        rank_pattern, alpha_pattern = {}, {}
        out_projs = {module_path(rec) for rec in records if is_mha_out_proj(rec.site)}
        entries = [e for e in entries if e[0] not in out_projs]   # they follow their attention module in HF
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
        if params:
            fields["target_parameters"] = sorted(p[0] for p in params)
        return fields, tensors


def _module_rules(cls, config, r, alpha, paths, mha_out, groups, common) -> list:
    """The rules for the module targets of an HF LORA file (one per (rank, alpha) group)."""
    base = hf_targets(config, paths)
    if mha_out:
        base = base | select.name(*(k for k, _ in mha_out.values()))
    others = [p for g, ps in groups.items() if g != (r, alpha) for p in ps]
    rules = []
    if not others or (r, alpha) in groups:
        rules.append(cls(rank=r, alpha=alpha, targets=base & ~select.name(*others) if others else base, **common))
    rules += [cls(rank=g[0], alpha=g[1], targets=select.name(*ps), **common)
              for g, ps in groups.items() if g != (r, alpha)]
    return rules


def _check_mha_pairs(records: list[AdapterRecord], rank_scaling: dict[str, tuple[int, float]]) -> None:
    """HF PEFT adapts an ``nn.MultiheadAttention`` whole: its in-projection (module ``<mha>``) and its
    ``<mha>.out_proj`` with one rank and one scaling. Anything else has no HF form."""
    mha = {rec.site["path"] for rec in records
           if rec.site.get("module_type") == "MultiheadAttention" and not is_mha_out_proj(rec.site)}
    outs = {rec.site["path"][: -len(".out_proj")] for rec in records if is_mha_out_proj(rec.site)}
    out_key = {m: module_path(rec) for rec in records if is_mha_out_proj(rec.site)
               for m in [rec.site["path"][: -len(".out_proj")]]}
    for m in sorted(mha ^ outs):
        have, lack = (m, f"{m}.out_proj") if m in mha else (f"{m}.out_proj", m)
        raise CheckpointError(
            f"the MultiheadAttention {m!r} has a LoRA on {have} but not on {lack}; HF PEFT adapts a "
            f"MultiheadAttention's in- and out-projection together (target_modules=[{m.rsplit('.', 1)[-1]!r}]). "
            f"Select both (select.name({m!r}, {m + '.out_proj'!r}) or select.type('MultiheadAttention')) or save "
            "in the peftfx format.")
    for m in sorted(mha):
        if rank_scaling[m] != rank_scaling[out_key[m]]:
            raise CheckpointError(
                f"the MultiheadAttention {m!r} has LoRA rank/scaling {rank_scaling[m]} on its in-projection and "
                f"{rank_scaling[out_key[m]]} on its out_proj; HF PEFT gives both one rank and one alpha. Use one "
                "rule for both or save in the peftfx format.")


# ----------------------------------------------------------------------------- experts (target_parameters)
# HF PEFT adapts a 3-D parameter with a ParamWrapper around its module; several parameters of one module nest, the
# first registered innermost, so the module's k-th of n targeted parameters (registration order) is stored under
# ``<module>.`` + ``base_layer.`` × (n − 1 − k) + ``lora_A.weight``. The tensors are in peftfx's layout already.
def _hf_param_match(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _split_parameter_paths(config: dict[str, Any], paths: list[str]) -> tuple[list[str], list[str]]:
    """(module paths, ParamWrapper paths) of an HF file: with ``target_parameters`` set, a path (``base_layer.``
    nesting stripped) that ``target_modules`` does not name is a parameter's."""
    if not config.get("target_parameters"):
        return paths, []
    tm = config.get("target_modules") or []
    mods, params = [], []
    for p in paths:
        bare = re.sub(r"(\.base_layer)+$", "", p)
        named = (compile_safe(tm).fullmatch(bare) is not None if isinstance(tm, str)
                 else _hf_param_match(bare, list(tm)))
        (mods if named and bare == p else params).append(p)
    return mods, params


def experts_key(rec: AdapterRecord, targets: list[str], suffix: str) -> str:
    """The HF key of an expert weight's LoRA tensor (``suffix``: ``lora_A.weight``/``lora_B.weight``)."""
    module, name = rec.site["path"], rec.site["weight"].rsplit(".", 1)[-1]
    taken = [n for n in rec.site["experts"]["siblings"] if _hf_param_match(f"{module}.{n}", targets)]
    depth = len(taken) - 1 - taken.index(name) if name in taken else 0
    return f"{PREFIX}{module}.{'base_layer.' * depth}{suffix}"


def write_experts(model: PeftModel, records: list[AdapterRecord], tensors: dict[str, torch.Tensor]):
    """Put the LoRA tensors of expert weights into ``tensors``; returns (their entries ``(parameter, rank, scaling,
    rule)``, the other records)."""
    experts = [rec for rec in records if rec.site.get("kind") == "experts"]
    if not experts:
        return [], records
    names = [rec.site["weight"] for rec in experts]
    entries = []
    for rec in experts:
        mod, rule = model.get_submodule(rec.name), model.peft_info.rules[rec.rule_index]
        for pname, p in mod.named_parameters():
            tensors[experts_key(rec, names, _LORA_KEYS[pname])] = p
        entries.append((rec.site["weight"], mod.rank, float(mod.scaling), rule))
    return entries, [rec for rec in records if rec.site.get("kind") != "experts"]


def _check_experts_uniform(params: list, r: int, rslora: bool, alpha: float) -> None:
    for name, rank, scaling, rule in params:
        need = scaling * (rank ** 0.5 if rslora else rank)
        if rank != r or rule.rslora != rslora or abs(need - alpha) > 1e-9 * max(1.0, abs(alpha)):
            raise CheckpointError(
                f"the expert weight {name!r} has LoRA rank {rank} / alpha {need:g}, the folder's r={r}, "
                f"lora_alpha={alpha:g}; peftfx writes target_parameters with the folder's one rank and alpha. Use "
                "one rank and alpha for expert weights and the other sites, or save in the peftfx format.")
