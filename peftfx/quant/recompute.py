"""Backward recompute of dequantized weights: a dequantized weight that autograd would save for backward is
saved as "its dequantizer" and rebuilt in backward (as bitsandbytes' MatMul4Bit does), so only the packed
weights stay in memory. Installed as forward hooks on the model (:func:`install_recompute`)."""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["install_recompute", "note_dequantized"]

class _Recompute:
    """saved_tensors_hooks for one forward: a saved tensor that is (a view of) a live dequantizer output is
    stored as (dequantizer, view geometry) and rebuilt in backward. A weak reference proves identity: while
    the dequantized tensor lives, no other tensor can own its storage address."""

    def __init__(self):
        self.live: dict[int, tuple[Any, nn.Module]] = {}

    def pack(self, t: torch.Tensor) -> Any:
        try:
            entry = self.live.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return t
        if entry is None or entry[0]() is None:
            return t
        return (_Recompute, entry[1], tuple(t.shape), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(p: Any) -> torch.Tensor:
        if isinstance(p, tuple) and p and p[0] is _Recompute:
            _, module, size, stride, offset = p
            with torch.no_grad(), _paused():
                return module().as_strided(size, stride, offset)
        return p


_ACTIVE: list[_Recompute] = []


class _paused:
    def __enter__(self):
        self.saved = list(_ACTIVE)
        _ACTIVE.clear()

    def __exit__(self, *exc):
        _ACTIVE.extend(self.saved)


def note_dequantized(out: torch.Tensor, module: nn.Module) -> None:
    if _ACTIVE and out.requires_grad is False and torch.is_grad_enabled():
        _ACTIVE[-1].live[out.untyped_storage().data_ptr()] = (weakref.ref(out), module)


def _enter(module, args, kwargs):
    if torch.is_grad_enabled() and module.training:
        ctx = _Recompute()
        hooks = torch.autograd.graph.saved_tensors_hooks(ctx.pack, ctx.unpack)
        hooks.__enter__()
        _ACTIVE.append(ctx)
        module._peftfx_recompute.append(hooks)
    else:
        module._peftfx_recompute.append(None)


def _exit(module, args, kwargs, output):
    hooks = module._peftfx_recompute.pop() if module._peftfx_recompute else None
    if hooks is not None:
        _ACTIVE.pop()
        hooks.__exit__(None, None, None)


def install_recompute(pm: nn.Module) -> None:
    """Recompute dequantized weights in backward instead of saving them (idempotent)."""
    if getattr(pm, "_peftfx_recompute", None) is not None:
        return
    pm._peftfx_recompute = []
    pm.register_forward_pre_hook(_enter, with_kwargs=True)
    pm.register_forward_hook(_exit, with_kwargs=True, always_call=True)
