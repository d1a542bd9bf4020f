"""ONNX for mixture-of-experts graphs: the grouped matmul that transformers-5 experts run by default
(``transformers.grouped_mm_fallback``, or ``aten._grouped_mm``) has no ONNX lowering in torch.onnx. transformers'
own ONNX exporter ships one (``transformers.exporters.exporter_onnx``: per expert a ``Gather`` of its rows, a
``MatMul`` and a ``Concat``, the expert count static); peftfx hands exactly those entries to ``torch.onnx.export``
when the graph holds such an op. Without them (an older transformers) the export fails naming the op; a model
whose experts run as ``model.set_experts_implementation("batched_mm")`` (gather + ``bmm``) exports with standard
ops either way."""
from __future__ import annotations

import logging
from typing import Any

from torch import fx

__all__ = ["grouped_mm_translations"]

log = logging.getLogger(__name__)

_GROUPED = {"grouped_mm_fallback", "_grouped_mm", "grouped_mm"}


def grouped_mm_translations(gm: fx.GraphModule) -> dict[Any, Any] | None:
    """{op: onnxscript function} for the grouped-matmul ops of ``gm`` (None when it has none, or when
    transformers offers no lowering for them)."""
    ops = {n.target for n in gm.graph.nodes
           if n.op == "call_function" and getattr(n.target, "_opname", None) in _GROUPED}
    if not ops:
        return None
    try:
        from transformers.exporters.exporter_onnx import _ONNX_TRANSLATION_TABLE as table
    except (ImportError, AttributeError):          # pragma: no cover - transformers < 5.24
        log.warning("this graph runs %s, which torch.onnx cannot lower, and the installed transformers offers no "
                    "ONNX translation; call model.set_experts_implementation('batched_mm') before peftfx.apply",
                    sorted(map(str, ops)))
        return None
    found = {op: table[op] for op in ops if op in table}
    return found or None
