"""The peftfx adapter format: ``adapter.safetensors`` (adapter tensors only) + ``adapter_config.json`` (rules,
sites, versions)."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from .._errors import CheckpointError, RuleError
from .._version import __version__
from ..methods import rules_from_data
from ..model import PeftModel
from .folder import read_tensors, write_folder
from .hf_aux import model_fields
from .state import adapter_state, require_adapters

__all__ = ["write_adapter", "read_adapter", "adapter_rules", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT"]

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
        **model_fields(model),          # auto_mapping (the model class), base_model_name_or_path, task_type
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
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the adapter is damaged.") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e.strerror or e}.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} holds a JSON {type(config).__name__}, expected an object with 'format' and "
                              "'rules'; the adapter is damaged or not a peftfx adapter.")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} has format {config.get('format')!r}, expected {FORMAT!r}.")
    if not isinstance(config.get("rules"), list) or not config["rules"]:
        raise CheckpointError(f"{cfg_path} has no 'rules' list (got {config.get('rules')!r:.80}); the adapter is "
                              "damaged — save it again with peftfx.save_adapter.")
    tensors = read_tensors(w_path)
    return config, tensors


def adapter_rules(config: dict[str, Any], path: str | os.PathLike) -> list:
    """The rules of a config read by :func:`read_adapter`; a malformed rule is a :class:`CheckpointError` naming
    the file (rules are validated like any others, see :mod:`peftfx.methods.base`)."""
    try:
        return rules_from_data(config["rules"])
    except RuleError as e:
        raise CheckpointError(f"{os.path.join(os.fspath(path), CONFIG_NAME)} holds a bad rule: {e}") from None
