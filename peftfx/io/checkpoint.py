"""Adapter-only checkpoints: :func:`save_adapter` and :func:`load_adapter`, in the peftfx format
(:mod:`peftfx.io.peftfx_format`) or Hugging Face PEFT's (:mod:`peftfx.io.hf`), written atomically and loaded with
safetensors only — never pickle."""
from __future__ import annotations

import os
from typing import Any

from torch import nn

from .._errors import CheckpointError
from ..apply import apply_to_graph
from ..model import PeftModel
from ..multi import adapter_names, adapter_view, add_adapter, is_multi
from ..trace import trace
from .hf import is_hf_adapter, load_hf_adapter, load_hf_into, save_hf_adapter
from .peftfx_format import adapter_rules, read_adapter, write_adapter
from .state import load_state

__all__ = ["load_adapter", "load_adapter_weights", "save_adapter"]


def save_adapter(model: PeftModel, path: str | os.PathLike, *, format: str = "peftfx",
                 adapter: str | None = None) -> str:
    """Write the adapter of ``model`` to folder ``path`` (created or replaced atomically); returns it.
    ``format="hf"`` writes a Hugging Face PEFT folder instead (:mod:`peftfx.io.hf`). On a model with
    named adapters (:mod:`peftfx.multi`) ``adapter`` picks one; it is written in the single-adapter form."""
    if adapter is not None or is_multi(model):
        model, adapter = adapter_view(model, adapter), adapter or adapter_names(model)[0]
    if format == "hf":
        return save_hf_adapter(model, path)
    if format != "peftfx":
        raise CheckpointError(f"save_adapter format must be 'peftfx' or 'hf', got {format!r}.")
    return write_adapter(model, path, adapter)


def load_adapter(model: nn.Module, path: str | os.PathLike, example_inputs: Any = None, *,
                 dynamic: bool = True, adapter: str | None = None) -> PeftModel:
    """Trace ``model``, apply the saved rules and load the saved adapter tensors. The model is left
    untouched if the checkpoint is damaged or does not fit it; a checkpoint holding NaN or infinite values is
    refused with a :class:`CheckpointError` naming the tensors (such an adapter makes every output NaN). A Hugging
    Face PEFT folder (config with ``peft_type``) is recognised and converted (:mod:`peftfx.io.hf`). Given a peftfx
    model instead, the adapter is added to it as named adapter ``adapter`` (:func:`peftfx.multi.add_adapter`)."""
    if isinstance(model, PeftModel):
        return add_adapter(model, adapter, path)
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"load_adapter needs a folder path, got {type(path).__name__}.")
    if is_hf_adapter(path):
        return load_hf_adapter(model, path, example_inputs, dynamic=dynamic)
    config, tensors = read_adapter(path)
    rules = adapter_rules(config, path)
    pm = trace(model, example_inputs, dynamic=dynamic)
    return apply_to_graph(pm, rules, fill=lambda pm_, plan, modules: load_state(modules, tensors, os.fspath(path)))


def load_adapter_weights(model: PeftModel, path: str | os.PathLike) -> PeftModel:
    """Copy the tensors of adapter folder ``path`` (peftfx or Hugging Face PEFT format) into the adapters ``model``
    already has — the same rules, sites and shapes — without tracing again (resuming training from an adapter-only
    checkpoint). A folder that does not fit is a :class:`CheckpointError` and ``model`` is unchanged."""
    if not isinstance(model, PeftModel) or not model.peft_info.adapters:
        raise CheckpointError("load_adapter_weights needs a model returned by peftfx.apply() with adapters.")
    if is_multi(model):
        raise CheckpointError("load_adapter_weights: this model has named adapters; load each with "
                              "peftfx.load_adapter(model, path, adapter=name).")
    if is_hf_adapter(path):
        load_hf_into(model, path)
        return model
    _, tensors = read_adapter(path)
    load_state(model.adapter_modules(), tensors, os.fspath(path))
    return model
