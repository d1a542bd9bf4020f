"""Adapter-only checkpoints: ``adapter.safetensors`` (adapter tensors only) + ``adapter_config.json``
(rules, sites, versions). Written into a temporary folder and renamed into place, so an interrupted save
never leaves a broken adapter. Loaded with safetensors only — never pickle."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from ._errors import CheckpointError
from .graph import PeftModel

__all__ = ["save_adapter", "load_adapter", "read_adapter", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT"]

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "peftfx-adapter/1"


def _adapter_state(pm: PeftModel) -> dict[str, torch.Tensor]:
    state = {}
    for name in pm.peft_info.adapters:
        for pname, p in pm.get_submodule(name).named_parameters():
            state[f"{name}.{pname}"] = p.detach().contiguous().cpu()
    return state


def save_adapter(model: PeftModel, path: str | os.PathLike, *, format: str = "peftfx",
                 adapter: str | None = None) -> str:
    """Write the adapter of ``model`` to folder ``path`` (created or replaced atomically); returns it.
    ``format="hf"`` writes a Hugging Face PEFT folder instead (:mod:`peftfx.formats.hf`). On a model with
    named adapters (:mod:`peftfx.multi`) ``adapter`` picks one; it is written in the single-adapter form."""
    from . import __version__
    from .multi import adapter_names, adapter_view, is_multi

    if adapter is not None or is_multi(model):
        model, adapter = adapter_view(model, adapter), adapter or adapter_names(model)[0]
    if format == "hf":
        from .formats.hf import save_hf_adapter

        return save_hf_adapter(model, path)
    if format != "peftfx":
        raise CheckpointError(f"save_adapter format must be 'peftfx' or 'hf', got {format!r}.")
    if not isinstance(model, PeftModel) or not model.peft_info.adapters:
        raise CheckpointError("save_adapter needs a model returned by peftfx.apply() with at least one adapter.")
    info = model.peft_info
    state = _adapter_state(model)
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


def write_folder(path: str | os.PathLike, tensors: dict[str, dict[str, torch.Tensor]],
                 configs: dict[str, dict[str, Any]], metadata: dict[str, str]) -> str:
    """Write an adapter folder atomically: safetensors files (``{file: tensors}``) and JSON files
    (``{file: config}``) go into a temporary folder beside ``path``, which replaces ``path`` only once all are
    written; on any error the temporary folder is removed and ``path`` is untouched."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".peftfx-tmp-", dir=parent)
    try:
        for name, state in tensors.items():
            save_file(state, os.path.join(tmp, name), metadata=metadata)
        for name, config in configs.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True, default=str)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_into_place(tmp: str, path: str) -> None:
    if os.path.isdir(path):
        old = path + ".peftfx-old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    elif os.path.exists(path):
        raise CheckpointError(f"{path} exists and is not a folder; choose another path for the adapter.")
    else:
        os.rename(tmp, path)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a peftfx adapter folder, checked for completeness."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path} cannot be read as safetensors ({e}); the file is truncated or "
                              "damaged — save the adapter again.") from None
    return config, tensors


def check_state(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every adapter parameter present with the right shape, and nothing extra; else one error listing all."""
    problems = []
    expected = {f"{n}.{p}": t for n, m in modules.items() for p, t in m.named_parameters()}
    for k, t in expected.items():
        if k not in tensors:
            problems.append(f"missing {k} (shape {tuple(t.shape)})")
        elif tuple(tensors[k].shape) != tuple(t.shape):
            problems.append(f"{k}: checkpoint shape {tuple(tensors[k].shape)}, model needs {tuple(t.shape)}")
    for k in tensors:
        if k not in expected:
            problems.append(f"unexpected {k} (no such adapter parameter in this model)")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"the adapter in {source} does not fit this model:\n  {shown}\n"
                              "Load it on the model it was trained on (same architecture and sizes).")


def load_adapter(model: nn.Module, path: str | os.PathLike, example_inputs: Any = None, *,
                 dynamic: bool = True, adapter: str | None = None) -> PeftModel:
    """Trace ``model``, apply the saved rules and load the saved adapter tensors. The model is left
    untouched if the checkpoint is damaged or does not fit it. A Hugging Face PEFT folder (config with
    ``peft_type``) is recognised and converted (:mod:`peftfx.formats.hf`). Given a peftfx model instead,
    the adapter is added to it as named adapter ``adapter`` (:func:`peftfx.multi.add_adapter`)."""
    if isinstance(model, PeftModel):
        from .multi import add_adapter

        return add_adapter(model, adapter, path)
    from .api import apply_to_graph
    from .formats.hf import is_hf_adapter, load_hf_adapter
    from .methods import rules_from_data
    from .trace import trace

    if is_hf_adapter(path):
        return load_hf_adapter(model, path, example_inputs, dynamic=dynamic)
    config, tensors = read_adapter(path)
    rules = rules_from_data(config["rules"])
    pm = trace(model, example_inputs, dynamic=dynamic)

    def load(pm_, plan, modules):
        check_state(modules, tensors, os.fspath(path))
        with torch.no_grad():
            for name, module in modules.items():
                for pname, p in module.named_parameters():
                    p.copy_(tensors[f"{name}.{pname}"].to(p.dtype))

    return apply_to_graph(pm, rules, _before_splice=load)
