"""Hugging Face PEFT adapter folders, both ways.

An HF PEFT folder holds ``adapter_config.json`` (its ``"peft_type"`` names the method) and
``adapter_model.safetensors``, whose keys name the adapted module with the adapter name stripped:
``base_model.model.<module path>.lora_A.weight``. peftfx keys are ``<site key>.<method>.<parameter>``
(``model.layers.0.self_attn.q_proj.lora.lora_A``). A site's key is its module path, so the two map one to one.

Converters form a registry keyed by ``peft_type`` (:func:`register_converter`); a converter is a small
class with

  ``peft_type``                         ``"LORA"``
  ``methods``                           the peftfx method names it writes (``("lora", "dora")``)
  ``read(config, tensors) → Imported``  the rules to apply, and the HF key of each adapter parameter;
                                        raises :class:`CheckpointError` naming every config field it cannot
                                        honour (:func:`check_fields`) — nothing is silently ignored
  ``write(model, records) → (config, tensors)``   the method's config fields and HF-named tensors

and nothing outside the converter branches on a method, so a new method is one more registered class.
Loading traces the model, applies the rules and fills the adapters from the file; the model is left
untouched when the file does not fit. Only safetensors are read — never pickle.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .._errors import CheckpointError
from ..graph import AdapterRecord, PeftModel
from ..methods import MethodConfig

__all__ = ["CONVERTERS", "register_converter", "Imported", "is_hf_adapter", "read_hf_folder",
           "load_hf_adapter", "save_hf_adapter", "check_fields", "module_path", "CONFIG_NAME", "WEIGHTS_NAME",
           "PREFIX"]

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

#: fields every HF config may carry that do not change the adapter's arithmetic
COMMON_FIELDS = frozenset({"peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode",
                           "peft_version", "auto_mapping"})

CONVERTERS: dict[str, type] = {}


def register_converter(cls: type) -> type:
    """Register a converter class (see the module docstring) under its ``peft_type``."""
    CONVERTERS[cls.peft_type] = cls
    return cls


@dataclass
class Imported:
    """What a converter's ``read`` returns."""

    rules: list[MethodConfig]
    hf_key: Callable[[AdapterRecord, str], str]        # (adapter record, peftfx parameter name) → HF key
    consumed: set[str] = field(default_factory=set)    # other HF keys the converter used (e.g. shared matrices)
    finish: Callable[[dict[str, nn.Module]], None] | None = None   # after the parameters are filled


# ------------------------------------------------------------------------------------------- helpers
def _neutral(value: Any) -> bool:
    return value is None or value is False or value == "none" or (isinstance(value, (str, list, dict, tuple))
                                                                  and len(value) == 0)


def check_fields(config: dict[str, Any], honoured: set[str] | frozenset[str],
                 hints: dict[str, str] | None = None) -> None:
    """Raise naming every field that is neither honoured nor at a neutral value (None, False, empty,
    ``"none"``): a value other than the default that peftfx cannot reproduce must never be dropped."""
    bad = [k for k, v in config.items() if k not in honoured and k not in COMMON_FIELDS and not _neutral(v)]
    if not bad:
        return
    hints = hints or {}
    lines = [f"{k}={config[k]!r}" + (f": {hints[k]}" if k in hints else "") for k in sorted(bad)]
    raise CheckpointError(
        f"this Hugging Face {config.get('peft_type')} adapter uses option(s) peftfx cannot honour:\n  "
        + "\n  ".join(lines) + "\nLoad it with the peft package instead, or retrain without these options.")


def module_path(record: AdapterRecord) -> str:
    """The HF module path of an adapter's site; an error for sites HF PEFT cannot address."""
    site = record.site
    if site["key"] != site["path"] or not site["path"]:
        raise CheckpointError(
            f"adapter {record.name} sits on site {site['key']!r}: a {site['op']} on parameter {site['weight']!r} "
            f"inside module {site['path'] or '<root>'!r}, not a module's own weight. HF PEFT names adapters by "
            "module and cannot store it; narrow the rule's targets to Linear/Conv1D/Embedding modules "
            "(select.type('Linear', 'Conv1D', 'Embedding')) or save in the peftfx format.")
    return site["path"]


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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    config = _read_config(path)
    if config is None:
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)} is missing or not valid JSON.")
    w_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(w_path):
        if os.path.isfile(os.path.join(path, PICKLE_NAME)):
            raise CheckpointError(f"{path} holds {PICKLE_NAME} (pickle), which peftfx never loads; re-save it "
                                  "with the peft package: model.save_pretrained(path, safe_serialization=True).")
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}; an HF PEFT adapter folder holds {CONFIG_NAME} "
                              f"and {WEIGHTS_NAME}.")
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path} cannot be read as safetensors ({e}); the file is damaged.") from None
    return config, tensors


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
    from ..api import apply_to_graph
    from ..trace import trace

    config, tensors = read_hf_folder(path)
    imported = _converter(config.get("peft_type")).read(config, tensors)
    pm = trace(model, example_inputs, dynamic=dynamic)

    def load(pm_: PeftModel, plan, modules: dict[str, nn.Module]) -> None:
        state = _match_tensors(pm_, plan, modules, imported, tensors, os.fspath(path))
        with torch.no_grad():
            for name, module in modules.items():
                for pname, p in module.named_parameters():
                    p.copy_(state[f"{name}.{pname}"].to(p.dtype))
            if imported.finish is not None:
                imported.finish(modules)

    return apply_to_graph(pm, imported.rules, _before_splice=load)


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
    from ..checkpoint import write_folder

    if not isinstance(model, PeftModel) or not model.peft_info.adapters:
        raise CheckpointError("save_adapter needs a model returned by peftfx.apply() with at least one adapter.")
    records = list(model.peft_info.adapters.values())
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
    config = {"peft_type": conv.peft_type, "task_type": None, "inference_mode": True,
              "base_model_name_or_path": None, "revision": None, **fields}
    if any(t.device.type == "meta" for t in tensors.values()):
        raise CheckpointError("the adapter lives on the meta device (no values); materialise the model first.")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_folder(path, {WEIGHTS_NAME: tensors}, {CONFIG_NAME: config}, {"format": "pt"})
    log.info("wrote HF PEFT %s adapter (%d tensors) to %s", conv.peft_type, len(tensors), path)
    return path


def _load_builtin() -> None:
    from . import hf_methods, hf_virtual  # noqa: F401


_load_builtin()
