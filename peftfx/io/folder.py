"""Adapter folders on disk: written into a temporary folder beside the destination and renamed into place, so an
interrupted save never leaves a broken folder (stale temporary folders of interrupted saves are cleaned on the next
save into the same folder, see :mod:`peftfx._fs`); written folders get the usual permissions (0755 under umask 022);
tensors read with safetensors only — never pickle — and refused when they hold NaN or infinity."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from .._errors import CheckpointError
from .._fs import make_temp_dir, path_problem, swap_into_place

__all__ = ["write_folder", "read_tensors", "check_finite"]


def write_folder(path: str | os.PathLike, tensors: dict[str, dict[str, torch.Tensor]],
                 configs: dict[str, dict[str, Any]], metadata: dict[str, str]) -> str:
    """Write an adapter folder atomically: safetensors files (``{file: tensors}``) and JSON files
    (``{file: config}``) go into a temporary folder beside ``path``, which replaces ``path`` only once all are
    written; on any error the temporary folder is removed and ``path`` is untouched. A place that cannot be
    written (a parent that is a file, no permission, a full disk) raises :class:`CheckpointError` naming ``path``."""
    from safetensors.torch import save_file

    path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(path, str) or not path:
        raise CheckpointError(f"save_adapter needs a folder path (a non-empty str or os.PathLike), got {path!r:.80}.")
    tmp = make_temp_dir(path, "tmp", CheckpointError, "the adapter")
    try:
        for name, state in tensors.items():
            save_file(state, os.path.join(tmp, name), metadata=metadata)
        for name, config in configs.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True, default=str)
        swap_into_place(tmp, path, CheckpointError)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the adapter to {path}: {path_problem(path, e)}; nothing was "
                              "changed there.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors holding NaN or ±infinity, naming them: an adapter with them turns every output NaN."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"{source} holds NaN or infinite values in {shown}; the adapter diverged or the file "
                              "is damaged. Retrain (lower the learning rate, check the loss) or load an earlier "
                              "checkpoint.")


def read_tensors(path: str, what: str = "the adapter") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a :class:`CheckpointError` naming the file (damaged, or holding NaN
    or infinity)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); the file is truncated or "
                              f"damaged — save {what} again.") from None
    check_finite(tensors, path)
    return tensors
