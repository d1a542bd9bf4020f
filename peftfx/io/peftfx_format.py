"""The peftfx adapter format: ``adapter.safetensors`` (adapter tensors only) + ``adapter_config.json`` (rules,
sites, versions)."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from .._errors import CheckpointError
from .._version import __version__
from ..model import PeftModel
from .folder import read_tensors, write_folder
from .state import adapter_state, require_adapters

__all__ = ["write_adapter", "read_adapter", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT"]

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "peftfx-adapter/1"


def write_adapter(model: PeftModel, path: str | os.PathLike, adapter: str | None = None) -> str:
    """Write ``model``'s adapters to folder ``path`` in the peftfx format (atomically); returns the path."""
    require_adapters(model)
    info = model.peft_info
    state = adapter_state(model.adapter_modules())
    if any(t.device.type == "meta" for t in state.values()):
        raise CheckpointError("the adapter lives on the meta device (no values); materialise the model first.")
    config = {
        "format": FORMAT, "peftfx_version": __version__, "torch_version": torch.__version__,
        "rules": [r.to_dict() for r in info.rules],
        "adapters": [{"name": r.name, "method": r.method, "rule_index": r.rule_index, "site": r.site}
                     for r in info.adapters.values()],
        "inputs": info.input_names,
        **({"adapter_name": adapter} if adapter else {}),
    }
    return write_folder(path, {WEIGHTS_NAME: state}, {CONFIG_NAME: config}, {"format": FORMAT})


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a peftfx adapter folder, checked for completeness."""
    path = os.fspath(path)
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"adapter folder {path!r} does not exist.")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"adapter folder {path!r} has no {os.path.basename(p)}; is it a peftfx adapter "
                                  f"(written by peftfx.save_adapter)?")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the adapter is damaged.") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} has format {config.get('format')!r}, expected {FORMAT!r}.")
    tensors = read_tensors(w_path)
    return config, tensors
