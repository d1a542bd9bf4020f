"""Export and serve: :func:`export_onnx` (merge → fold → ONNX → verified in ONNX Runtime), :class:`Runtime`
(ONNX Runtime session, providers, I/O binding, greedy generation with a key/value cache) and the one-base,
many-adapters mode (:func:`write_onnx_adapter`). onnx/onnxruntime are imported only when these are used."""
from __future__ import annotations

from .adapters import adapter_inputs, write_onnx_adapter
from .onnx import DEFAULT_OPSET, TOLERANCE, ExportReport, export_onnx
from .quantize import Int8
from .runtime import Runtime, gpu_present, select_providers

__all__ = ["export_onnx", "ExportReport", "Int8", "Runtime", "write_onnx_adapter", "adapter_inputs", "select_providers",
           "gpu_present", "DEFAULT_OPSET", "TOLERANCE"]
