"""Adapter tensors in and out of adapter modules: the one place that collects, checks and loads them."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import CheckpointError
from ..model import PeftModel

__all__ = ["adapter_state", "check_state", "load_state", "require_adapters"]


def require_adapters(model: Any) -> None:
    """What saving needs: a peftfx model with at least one adapter."""
    if not isinstance(model, PeftModel) or not model.peft_info.adapters:
        raise CheckpointError("save_adapter needs a model returned by peftfx.apply() with at least one adapter.")


def adapter_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{adapter name}.{parameter name}`` → a contiguous CPU copy of every adapter parameter."""
    return {f"{name}.{pname}": p.detach().contiguous().cpu()
            for name, module in modules.items() for pname, p in module.named_parameters()}


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


def load_state(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Check ``tensors`` against the modules' parameters (:func:`check_state`), then copy them in."""
    check_state(modules, tensors, source)
    with torch.no_grad():
        for name, module in modules.items():
            for pname, p in module.named_parameters():
                p.copy_(tensors[f"{name}.{pname}"].to(p.dtype))
