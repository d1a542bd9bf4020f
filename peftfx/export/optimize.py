"""The optimisation stage of :func:`~peftfx.export.export_onnx`: ONNX Runtime's fused ops in the exported file.

Levels (``optimize=``):

* ``"none"`` — the file as torch.onnx writes it (its own onnxscript optimiser has already folded constants).
* ``"basic"`` — onnxscript's pattern fusions for ONNX Runtime, ``onnxscript.rewriter.ort_fusions.optimize_for_ort``:
  LayerNorm/RMSNorm and their residual ``Skip…`` forms, GELU/BiasGelu, rotary embeddings, and attention
  (``sdpa`` → ``MultiHeadAttention``, with the q/k/v projections packed into one ``Attention`` where they read one
  input). Provider-neutral: the same file for CPU and CUDA.
* ``"all"`` — transformers' provider-aware pipeline (``transformers.exporters.onnxruntime_fusions.
  fuse_for_onnxruntime``, the one behind ``OnnxConfig(ort_fusions=…)``) for the provider the file is meant for
  (``target``: ``"cpu"`` or ``"cuda"``): the ``basic`` fusions, then rewrites that ONNX Runtime runs faster on that
  provider — sibling projections packed into one ``MatMul``, ``GroupQueryAttention`` over a cache, and on CPU
  ``MultiHeadAttention`` over an attention bias turned back into matmuls (its CPU kernel is slower,
  microsoft/onnxruntime#33873). Where transformers' exporters are not installed, ``"all"`` is ``"basic"``.

Both rewrite the graph with ops that compute exactly what they replace; the fused file is then verified in ONNX
Runtime against PyTorch like every export. What peftfx adds: the stage runs on a verified-to-be file in the export's
temporary folder (never a half-written destination), keeps the graph's inputs and outputs — adapter inputs of
``adapter_inputs=True`` included, in order, with their names — and refuses a result that lost or renamed one; it
counts the fused ops per type (``ExportReport.optimize["fused"]``). Default (``optimize=None``): ``"all"`` for
float32 and int8 files; float16 files for CPU stay ``"none"`` (ONNX Runtime's CPU kernels of the fused ops are
float32-only), for CUDA they take ``"all"`` with ``target="cuda"``.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any

from .._errors import ExportError

__all__ = ["FUSED_DOMAINS", "LEVELS", "fused_ops", "optimize_file", "resolve_level"]

log = logging.getLogger(__name__)

LEVELS = ("none", "basic", "all")
TARGETS = ("cpu", "cuda")
FUSED_DOMAINS = ("com.microsoft",)


def resolve_level(optimize: str | None, dtype: str, device: str | None) -> tuple[str, str]:
    """``(level, target)`` for an ``optimize=`` argument (``None``: the measured default, see the module doc)."""
    if optimize is not None and optimize not in LEVELS:
        raise ExportError(f"optimize must be one of {LEVELS} or None (automatic), got {optimize!r}.")
    target = "cuda" if device == "cuda" or dtype == "bfloat16" else "cpu"
    if optimize is None:
        optimize = "none" if dtype == "float16" and target == "cpu" else "all"
    return optimize, target


def fused_ops(path_or_model: Any) -> dict[str, int]:
    """Op type → count of ONNX Runtime contrib ops (domain ``com.microsoft``) in a file or ``onnx.ModelProto``."""
    import onnx

    proto = onnx.load(os.fspath(path_or_model), load_external_data=False) \
        if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    counts = collections.Counter(n.op_type for n in proto.graph.node if n.domain in FUSED_DOMAINS)
    return dict(sorted(counts.items()))


def _io(model) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]


def _fuse(model, level: str, target: str) -> str:
    """Run the fusions of ``level`` on an onnx_ir model in place; returns which pipeline ran."""
    if level == "all":
        try:
            from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime
        except ImportError:             # transformers without its exporters: onnxscript's fusions alone
            fuse_for_onnxruntime = None
        if fuse_for_onnxruntime is not None:
            fuse_for_onnxruntime(model, target)
            return f"transformers fuse_for_onnxruntime({target!r})"
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    optimize_for_ort(model)
    return "onnxscript optimize_for_ort"


def optimize_file(path: str, level: str, target: str = "cpu") -> dict[str, Any]:
    """Fuse the ONNX file at ``path`` in place (``level`` ``"basic"``/``"all"``; ``"none"`` does nothing).

    Returns ``{"level", "target", "pipeline", "fused": {op: count}, "seconds"}``. Raises :class:`ExportError`, with
    the file unchanged, if a fusion step fails or the graph's inputs/outputs would change."""
    if level not in LEVELS:
        raise ExportError(f"optimize must be one of {LEVELS}, got {level!r}.")
    if target not in TARGETS:
        raise ExportError(f"the optimisation target must be one of {TARGETS}, got {target!r}.")
    info: dict[str, Any] = {"level": level, "target": target, "pipeline": None, "fused": {}, "seconds": 0.0}
    if level == "none":
        return info
    import onnx_ir as ir

    t = time.perf_counter()
    data = path + ".data"
    model = ir.load(path)
    if os.path.exists(data):
        ir.external_data.load_to_model(model)       # in memory: the file is rewritten below
    before = _io(model)
    import onnx

    try:        # the file as torch.onnx wrote it; the fused one has ONNX Runtime's ops, which onnx's checker lacks
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported model: {str(e).splitlines()[0][:300]}") from None
    try:
        info["pipeline"] = _fuse(model, level, target)
    except Exception as e:  # a fusion library's own error: say which stage, and how to export without it
        raise ExportError(f"the ONNX Runtime fusions (optimize={level!r}) failed on this graph: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}; "
                          "export with optimize='none' (or 'basic').") from e
    after = _io(model)
    if after != before:
        raise ExportError(f"the ONNX Runtime fusions (optimize={level!r}) changed the graph's inputs/outputs "
                          f"({before} → {after}); export with optimize='none'.")
    tmp = path + ".fused.onnx"
    if os.path.exists(data):
        ir.save(model, tmp, external_data=os.path.basename(data) + ".fused")
        os.replace(os.path.join(os.path.dirname(path), os.path.basename(data) + ".fused"), data)
        _relocate(tmp, os.path.basename(data))
    else:
        ir.save(model, tmp)
    os.replace(tmp, path)
    info["fused"] = fused_ops(path)
    info["seconds"] = time.perf_counter() - t
    log.info("optimize=%s (%s): %s in %.2fs", level, info["pipeline"], info["fused"], info["seconds"])
    return info


def _relocate(path: str, location: str) -> None:
    """Point every external tensor of the file at ``path`` to ``location`` (the data file was renamed)."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)
