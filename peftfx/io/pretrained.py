"""``save_pretrained`` with Hugging Face's calling convention: the adapter files written *into* a folder.

``PreTrainedModel.save_pretrained`` and ``peft.PeftModel.save_pretrained`` add their files to ``save_directory``
and keep whatever else is there (a Trainer's output folder holds ``checkpoint-N/`` folders, the tokenizer,
``training_args.bin``); callers pass ``is_main_process`` (only the main rank writes), ``state_dict`` (the full
values gathered from a sharded or wrapped model: FSDP, DeepSpeed) and ``safe_serialization``. Here the adapter
folder (:func:`peftfx.io.checkpoint.save_adapter`, written whole into a private folder first) has its files renamed
into ``save_directory`` one by one (:func:`peftfx._fs.write_files_into`): no file is ever half-written and nothing
else in the folder is touched, except the other format's weights file from an earlier save (it would contradict the
new ``adapter_config.json``). A ``state_dict`` supplies the adapter values (keys as in ``model.state_dict()``);
the live parameters, which may be shards, are not read then.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .._errors import CheckpointError
from .._fs import write_files_into
from ..model import PeftModel
from .checkpoint import save_adapter

__all__ = ["save_pretrained"]

#: the weights file of each adapter format (Hugging Face PEFT, peftfx)
_WEIGHTS = frozenset({"adapter_model.safetensors", "adapter.safetensors"})

#: Hugging Face keywords that change nothing about an adapter folder written here.
_IGNORED = frozenset({"max_shard_size", "variant", "token", "save_embedding_layers", "save_peft_format",
                      "save_original_format", "commit_message", "private", "create_pr"})


def save_pretrained(pm: PeftModel, save_directory: str | os.PathLike, *, format: str = "hf",
                    adapter: str | None = None, is_main_process: bool = True,
                    state_dict: dict[str, torch.Tensor] | None = None, safe_serialization: bool = True,
                    selected_adapters: list[str] | None = None, push_to_hub: bool = False, **kwargs: Any) -> str:
    """Write the adapter of ``pm`` into folder ``save_directory`` (created if missing; other files there are kept):
    a Hugging Face PEFT folder by default (``adapter_model.safetensors`` + ``adapter_config.json``, loads with
    ``peft.PeftModel.from_pretrained`` and :func:`peftfx.load_adapter`), ``format="peftfx"`` for methods HF PEFT
    has no form for. ``is_main_process=False`` writes nothing; ``state_dict`` gives the adapter values (see the
    module docstring); ``selected_adapters=[name]`` is ``adapter=name``. Safetensors only:
    ``safe_serialization=False`` (pickle) is refused, and so is ``push_to_hub`` (no network here)."""
    if not safe_serialization:
        raise CheckpointError("peftfx writes safetensors only, never pickle; call save_pretrained with "
                              "safe_serialization=True (the default).")
    if push_to_hub:
        raise CheckpointError("save_pretrained(push_to_hub=True) is not supported: write the folder, then upload it "
                              "with huggingface_hub.upload_folder.")
    unknown = sorted(set(kwargs) - _IGNORED)
    if unknown:
        raise CheckpointError(f"save_pretrained() got unexpected keyword argument(s) {unknown}.")
    if selected_adapters is not None:
        if len(selected_adapters) != 1 or (adapter is not None and adapter != selected_adapters[0]):
            raise CheckpointError(f"save_pretrained writes one adapter per folder; got selected_adapters="
                                  f"{selected_adapters!r}. Save each with save_pretrained(path, adapter=name).")
        adapter = selected_adapters[0]
    out = os.fspath(save_directory)
    if not is_main_process:
        return out
    source = pm if state_dict is None else _with_values(pm, state_dict)

    def write(tmp: str) -> str:
        return save_adapter(source, os.path.join(tmp, "adapter"), format=format, adapter=adapter)

    names = write_files_into(out, write, ".peftfx-save-")
    for stale in _WEIGHTS - set(names):      # the other format's weights from an earlier save would contradict the
        path = os.path.join(out, stale)      # config just written
        if os.path.isfile(path):
            os.remove(path)
    return out


def _with_values(pm: PeftModel, state_dict: dict[str, torch.Tensor]) -> PeftModel:
    """A fork of ``pm`` whose adapter modules are copies holding ``state_dict``'s values (``pm`` is untouched)."""
    twin = pm.fork()
    missing = []
    for name, module in pm.adapter_modules().items():
        clone = copy.deepcopy(module)
        with torch.no_grad():
            for pname, p in clone.named_parameters():
                value = state_dict.get(f"{name}.{pname}")
                if value is None:
                    missing.append(f"{name}.{pname}")
                elif tuple(value.shape) != tuple(p.shape):
                    raise CheckpointError(f"save_pretrained(state_dict=…): {name}.{pname} has shape "
                                          f"{tuple(value.shape)}, the model's is {tuple(p.shape)}.")
                else:
                    p.data = value.detach().to(p.dtype)
        twin.set_submodule(name, clone)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"save_pretrained(state_dict=…): the state dict lacks adapter tensor(s) {shown}; pass "
                              "the model's full state dict (keys as in model.state_dict()) or none.")
    return twin

