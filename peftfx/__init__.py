"""peftfx — parameter-efficient fine-tuning as graph passes over torch.fx.

    peft = peftfx.apply(model, [LoRA(rank=8, alpha=16, targets=select.role("attn.q") | select.role("attn.v"))],
                        example_inputs={"input_ids": ids})

This module is the public face only: every name here is defined in the room it belongs to (see the README's
"Package map").
"""
from __future__ import annotations

from ._errors import (CheckpointError, ConflictError, ExportError, NoMatchError, PassError, PeftfxError,
                      RuleError, SiteError, TraceError)
from ._version import __version__
from .apply import (InspectReport, apply, fold, inspect, merge, print_trainable, trainable_parameters,
                    unmerge)
from .export import ExportReport, Runtime, export_onnx, write_onnx_adapter
from .io.checkpoint import load_adapter, save_adapter
from .layers import gradient_checkpointing
from .methods import METHODS, MethodConfig, rules_from_data
from .methods.dora import DoRA
from .methods.houlsby import Adapter, Houlsby
from .methods.ia3 import IA3
from .methods.lora import LoRA
from .methods.prefix import PrefixTuning
from .methods.prompt import PromptTuning
from .methods.ptuning import PTuning
from .methods.vera import VeRA
from .model import PeftModel
from .multi import (active_adapters, adapter_names, add_adapter, combine, delete_adapter, forward_mixed,
                    mixed_batch, set_active)
from .quant import quantize
from .rules import Selector, select
from .trace import trace
from .variants import disable_adapter
from .dropin import merge_and_unload

__all__ = [
    "__version__", "apply", "inspect", "print_trainable", "trainable_parameters", "trace", "merge", "unmerge",
    "fold", "save_adapter", "load_adapter", "rules_from_data", "select", "Selector",
    "LoRA", "IA3", "Houlsby", "Adapter", "DoRA", "VeRA", "PromptTuning", "PrefixTuning", "PTuning",
    "MethodConfig", "METHODS", "PeftModel", "InspectReport",
    "PeftfxError", "TraceError", "RuleError", "NoMatchError", "ConflictError", "SiteError", "CheckpointError",
    "PassError", "ExportError",
    "add_adapter", "set_active", "active_adapters", "adapter_names", "delete_adapter", "combine", "mixed_batch",
    "forward_mixed", "quantize",
    "export_onnx", "ExportReport", "Runtime", "write_onnx_adapter", "disable_adapter", "merge_and_unload",
    "gradient_checkpointing",
]
