"""Hugging Face PEFT adapter folders, both ways: reading and writing the folder, and loading it into a traced
model. The per-method converters live beside their methods (``peftfx/methods/*_hf.py``, contract in
:mod:`peftfx.methods._hf`). Loading traces the model, applies the rules and fills the adapters from the file;
the model is left untouched when the file does not fit. Only safetensors are read — never pickle.
"""
from __future__ import annotations

import json
import logging
import os
import types
from typing import Any

import torch
from torch import nn

from .._errors import CheckpointError, RuleError
from ..apply import apply_to_graph
from ..methods._hf import CONVERTERS, PREFIX, Imported
from ..model import PeftModel
from ..trace import trace
from .folder import read_tensors, write_folder
from .hf_aux import AUX_METHODS, combine, heads_saved, model_fields, read_aux, write_aux
from .state import load_state, require_adapters

__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "is_hf_adapter",
    "load_hf_adapter",
    "read_hf_folder",
    "save_hf_adapter",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


# ------------------------------------------------------------------------------------------- helpers
def _fit(t: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``t`` in ``shape`` if equal up to size-1 dimensions (HF stores IA3 vectors as [n, 1]), else None."""
    if tuple(t.shape) == tuple(shape):
        return t
    if [d for d in t.shape if d != 1] == [d for d in shape if d != 1]:
        return t.reshape(shape)
    return None


# ------------------------------------------------------------------------------------------- folders
def _read_config(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) else None


def is_hf_adapter(path: str | os.PathLike) -> bool:
    """True for a folder whose config has ``peft_type`` (HF PEFT) rather than peftfx's ``format``."""
    config = _read_config(os.fspath(path)) if os.path.isdir(path) else None
    return bool(config) and "peft_type" in config and "format" not in config


def read_hf_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an HF PEFT adapter folder."""
    path = os.fspath(path)
    config = _read_config(path)
    if config is None:
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)} is missing, not valid JSON or not a JSON object.")
    w_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(w_path):
        if os.path.isfile(os.path.join(path, PICKLE_NAME)):
            raise CheckpointError(f"{path} holds {PICKLE_NAME} (pickle), which peftfx never loads; re-save it "
                                  "with the peft package: model.save_pretrained(path, safe_serialization=True).")
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}; an HF PEFT adapter folder holds {CONFIG_NAME} "
                              f"and {WEIGHTS_NAME}.")
    return config, read_tensors(w_path, "the adapter with the peft package")


def _converter(peft_type: Any) -> type:
    conv = CONVERTERS.get(str(peft_type).upper())
    if conv is None:
        raise CheckpointError(f"Hugging Face peft_type {peft_type!r} has no peftfx converter; supported: "
                              f"{', '.join(sorted(CONVERTERS))}.")
    return conv


# ------------------------------------------------------------------------------------------- load
def load_hf_adapter(model: nn.Module, path: str | os.PathLike, example_inputs: Any = None, *,
                    dynamic: bool = True) -> PeftModel:
    """Trace ``model``, apply the rules equivalent to the HF config and load the HF tensors into them."""
    config, tensors = read_hf_folder(path)
    imported = _import(config, tensors, os.path.join(os.fspath(path), CONFIG_NAME))
    pm = trace(model, example_inputs, dynamic=dynamic)

    def load(pm_: PeftModel, plan, modules: dict[str, nn.Module]) -> None:
        state = _match_tensors(pm_, plan, modules, imported, tensors, os.fspath(path))
        load_state(modules, state, os.fspath(path))
        if imported.finish is not None:
            with torch.no_grad():
                imported.finish(modules)

    return apply_to_graph(pm, imported.rules, fill=load)


def load_hf_into(pm: PeftModel, path: str | os.PathLike) -> None:
    """Copy the tensors of the HF PEFT folder ``path`` into the adapters ``pm`` already has (a Trainer resuming
    from an adapter-only checkpoint). Every adapter parameter must be in the file with its shape, and nothing else;
    else a :class:`CheckpointError` and ``pm`` is unchanged."""
    config, tensors = read_hf_folder(path)
    imported = _import(config, tensors, os.path.join(os.fspath(path), CONFIG_NAME))
    modules = pm.adapter_modules()

    state = _match_tensors(pm, types.SimpleNamespace(declines=()), modules, imported, tensors, os.fspath(path))
    load_state(modules, state, os.fspath(path))


def _import(config: dict[str, Any], tensors: dict[str, torch.Tensor], cfg_path: str) -> Imported:
    """The converter's rules for ``config``, plus the rules of its ``modules_to_save`` and
    ``trainable_token_indices`` (:mod:`peftfx.io.hf_aux`, for every peft_type). Its values pass the same validation
    as any rule (types, ranges, finiteness: ``lora_alpha: NaN`` is refused); a bad value is a
    :class:`CheckpointError` naming the file."""
    conv = _converter(config.get("peft_type"))
    try:
        config, aux = read_aux(config, tensors)
        imported = conv.read(config, {k: v for k, v in tensors.items() if k not in aux.consumed})
        return combine(imported, aux)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except (RuleError, TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        detail = f"{type(e).__name__}: {e}" if not isinstance(e, RuleError) else str(e)
        raise CheckpointError(f"{cfg_path} has a value peftfx cannot use ({detail}); fix the file or re-save the "
                              "adapter with the peft package.") from None


def _match_tensors(pm: PeftModel, plan, modules, imported: Imported, tensors, source: str):
    state, used, problems = {}, set(imported.consumed), []
    for name, module in modules.items():
        rec = pm.peft_info.adapters[name]
        for pname, p in module.named_parameters():
            key = imported.hf_key(rec, pname)
            if key not in tensors:
                problems.append(f"missing {key} (for {name}.{pname}, shape {tuple(p.shape)})")
                continue
            used.add(key)
            t = _fit(tensors[key], p.shape)
            if t is None:
                problems.append(f"{key}: file shape {tuple(tensors[key].shape)}, model needs {tuple(p.shape)}")
            state[f"{name}.{pname}"] = t
    problems += [f"unexpected {k} (no adapter of this model takes it)" for k in sorted(set(tensors) - used)]
    if problems:
        declined = [f"{k}: {why}" for _, k, why in plan.declines][:5]
        shown = "\n  ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(
            f"the Hugging Face adapter in {source} does not fit this model:\n  {shown}\n"
            + (f"declined sites: {'; '.join(declined)}\n" if declined else "")
            + "Load it on the model it was trained on (same architecture, sizes and module names).")
    return state


# ------------------------------------------------------------------------------------------- save
def save_hf_adapter(model: PeftModel, path: str | os.PathLike) -> str:
    """Write ``model``'s adapter as an HF PEFT folder that ``peft.PeftModel.from_pretrained`` loads."""
    require_adapters(model)
    records = [r for r in model.peft_info.adapters.values() if r.method not in AUX_METHODS]
    aux_records = [r for r in model.peft_info.adapters.values() if r.method in AUX_METHODS]
    if not records and all(r.method == "trainable_tokens" for r in aux_records):
        records, aux_records = aux_records, []          # trainable tokens alone: HF's TRAINABLE_TOKENS
    if not records:
        raise CheckpointError("this model has only modules_to_save / trainable-token adapters; an HF PEFT folder "
                              "records them beside a method (LoRA …). Save in the peftfx format instead.")
    methods = sorted({r.method for r in records})
    convs = {c for c in CONVERTERS.values() for m in methods if m in c.methods}
    missing = [m for m in methods if not any(m in c.methods for c in CONVERTERS.values())]
    if missing or len(convs) != 1:
        raise CheckpointError(
            f"this model has adapters of method(s) {methods}; an HF PEFT folder holds one peft_type and "
            f"peftfx writes {sorted(m for c in CONVERTERS.values() for m in c.methods)}"
            + (f" (no HF form for {missing})" if missing else "") + ". Save in the peftfx format instead.")
    conv = convs.pop()
    fields, tensors = conv.write(model, records)
    aux_fields, aux_tensors = write_aux(model, aux_records)
    tensors.update(aux_tensors)
    recorded = model_fields(model)
    task = fields.get("task_type") or recorded.pop("task_type", None)      # a method's own task_type comes first
    recorded.pop("task_type", None)
    if not heads_saved(task, aux_fields.get("modules_to_save") or []):
        task = None      # HF's SEQ_CLS/TOKEN_CLS/QA wrappers would expect the head's trained copy in the file
    config = {"peft_type": conv.peft_type, "inference_mode": True, "base_model_name_or_path": None,
              "revision": None, **fields, **aux_fields, **recorded, "task_type": task}
    if any(t.device.type == "meta" for t in tensors.values()):
        raise CheckpointError("the adapter lives on the meta device (no values); materialise the model first.")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_folder(path, {WEIGHTS_NAME: tensors}, {CONFIG_NAME: config}, {"format": "pt"})
    log.info("wrote HF PEFT %s adapter (%d tensors) to %s", conv.peft_type, len(tensors), path)
    return path
