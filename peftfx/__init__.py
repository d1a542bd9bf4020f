"""peftfx — parameter-efficient fine-tuning as graph passes over torch.fx.

    peft = peftfx.apply(model, [LoRA(rank=8, alpha=16, targets=select.role("attn.q") | select.role("attn.v"))],
                        example_inputs={"input_ids": ids})
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._errors import (CheckpointError, ConflictError, ExportError, NoMatchError, PassError, PeftfxError,
                      RuleError, SiteError, TraceError)
from .api import InspectReport, apply, inspect, print_trainable, trainable_parameters
from .checkpoint import load_adapter, save_adapter
from .graph import PeftModel
from .methods import METHODS, MethodConfig, rules_from_data
from .methods.lora import LoRA
from .rules import Selector, select
from .trace import trace

__all__ = [
    "__version__", "apply", "inspect", "print_trainable", "trainable_parameters", "trace", "merge", "unmerge",
    "save_adapter", "load_adapter", "rules_from_data", "select", "Selector", "LoRA", "MethodConfig", "METHODS",
    "PeftModel", "InspectReport", "PeftfxError", "TraceError", "RuleError", "NoMatchError", "ConflictError",
    "SiteError", "CheckpointError", "PassError", "ExportError",
]


def merge(model: PeftModel, *, inplace: bool = False) -> PeftModel:
    """Fold every mergeable adapter into its weight; their nodes disappear. Returns a new module whose
    merged weights are private copies (``inplace=True`` updates the shared weights instead, saving memory
    but changing the original model's tensors too). Non-mergeable adapters stay in the graph."""
    from .passes.merge import merge_pass

    _require_peft(model, "merge")
    return merge_pass(model, inplace=inplace).graph_module


def unmerge(model: PeftModel, *, inplace: bool = False) -> PeftModel:
    """Undo :func:`merge`: subtract each merged adapter from its weight and splice its node back."""
    from .passes.merge import unmerge_pass

    _require_peft(model, "unmerge")
    return unmerge_pass(model, inplace=inplace).graph_module


def _require_peft(model, what: str) -> None:
    if not isinstance(model, PeftModel):
        raise PeftfxError(f"{what}() takes a model returned by peftfx.apply(), got {type(model).__name__}.")
