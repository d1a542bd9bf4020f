"""Adapter folders on disk: written into a temporary folder beside the destination and renamed into place, so an
interrupted save never leaves a broken folder; tensors read with safetensors only — never pickle."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

from .._errors import CheckpointError

__all__ = ["write_folder", "read_tensors"]


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


def read_tensors(path: str, what: str = "the adapter") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a :class:`CheckpointError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); the file is truncated or "
                              f"damaged — save {what} again.") from None
