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
from .methods.adapter import Adapter
from .methods.ia3 import IA3
from .methods.dora import DoRA
from .methods.lora import LoRA
from .methods.prefix import PrefixTuning
from .methods.prompt import PromptTuning
from .methods.ptuning import PTuning
from .passes.fold import fold
from .methods.vera import VeRA
from .multi import (active_adapters, adapter_names, add_adapter, combine, delete_adapter, forward_mixed,
                    mixed_batch, set_active)
from .quant import quantize
from .rules import Selector, select
from .trace import trace
from .export import ExportReport, Runtime, export_onnx, write_onnx_adapter

__all__ = [
    "__version__", "apply", "inspect", "print_trainable", "trainable_parameters", "trace", "merge", "unmerge",
    "save_adapter", "load_adapter", "rules_from_data", "select", "Selector", "LoRA", "IA3", "Adapter",
    "DoRA", "VeRA", "MethodConfig", "METHODS",
    "PeftModel", "InspectReport", "PeftfxError", "TraceError", "RuleError", "NoMatchError", "ConflictError",
    "SiteError", "CheckpointError", "PassError", "ExportError",
    "add_adapter", "set_active", "active_adapters", "adapter_names", "delete_adapter", "combine", "mixed_batch",
    "forward_mixed", "quantize",
    "PromptTuning", "PrefixTuning", "PTuning", "fold",
    "export_onnx", "ExportReport", "Runtime", "write_onnx_adapter",
]


def merge(model: PeftModel, *, inplace: bool = False) -> PeftModel:
    """Fold every mergeable adapter into its weight; their nodes disappear. Returns a new module whose
    merged weights are private copies (``inplace=True`` updates the shared weights instead, saving memory
    but changing the original model's tensors too). Non-mergeable adapters stay in the graph."""
    from .passes.merge import merge_pass
    from .quant import merge as merge_quantized, quantized_weights

    _require_peft(model, "merge")
    if quantized_weights(model):   # dequantize → merge → re-quantize (peftfx.quant.merge for the options)
        return merge_quantized(model, inplace=inplace)
    return merge_pass(model, inplace=inplace).graph_module


def unmerge(model: PeftModel, *, inplace: bool = False) -> PeftModel:
    """Undo :func:`merge`: subtract each merged adapter from its weight and splice its node back."""
    from .passes.merge import unmerge_pass
    from .quant import check_unmerge

    _require_peft(model, "unmerge")
    check_unmerge(model)
    return unmerge_pass(model, inplace=inplace).graph_module


def _require_peft(model, what: str) -> None:
    if not isinstance(model, PeftModel):
        raise PeftfxError(f"{what}() takes a model returned by peftfx.apply(), got {type(model).__name__}.")
