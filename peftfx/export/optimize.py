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
  microsoft/onnxruntime#33873). For CPU, peftfx then turns each ``SkipLayerNormalization`` back into ``Add`` +
  ``LayerNormalization`` (measured: ORT 1.32's CPU kernel of the fused op is ~10× slower, 18 % of MiniLM's time;
  ``_unfuse_skip_layernorm``). Where transformers' exporters are not installed, ``"all"`` is ``"basic"`` (+ that
  CPU rewrite). A ``kv_cache=True`` file then gets each layer's cached attention as one ``GroupQueryAttention``
  (:func:`optimize_kv_attention`, :mod:`peftfx.export._kv_fusion`), its cache inputs/outputs laid out
  ``[batch, kv_heads, sequence, head_dim]``; a graph it cannot rewrite soundly keeps its attention (warning, reason
  in ``info["kv_attention"]``).

Measured and not adopted for CPU float32 (``bench/bench_ort_fp32.py``; README "Serving"): the same weight products as
``Gemm`` with bias, transposed weights or ``FusedMatMul`` (within 3 % of ``MatMul``, ``FusedMatMul`` slower),
``MatMul`` + ``MultiHeadAttention`` or a 2-D ``mask_index`` instead of the packed ``Attention`` (slower),
``FastGelu`` for ``BiasGelu`` (moves MiniLM's logits past the 1e-4 verification tolerance), and session settings
other than ORT's defaults. MiniLM's float32 GEMMs alone take 0.81× PyTorch eager's time at 8 × 128 in ORT, so no
float32 graph rewrite reaches issue 13's 0.8 there.

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

__all__ = ["FUSED_DOMAINS", "LEVELS", "fused_ops", "optimize_file", "optimize_kv_attention", "resolve_level"]

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
    """Op type → count of ONNX Runtime contrib ops (domain ``com.microsoft``, and ORT's own ops it registers in the
    default domain, e.g. ``SimplifiedLayerNormalization``, which ONNX does not define) in a file or ModelProto."""
    import onnx

    proto = onnx.load(os.fspath(path_or_model), load_external_data=False) \
        if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    counts = collections.Counter(n.op_type for n in proto.graph.node if n.domain in FUSED_DOMAINS or (
        n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)))
    return dict(sorted(counts.items()))


def _io(model) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]


def _gemm_to_matmul(model) -> int:
    """``Gemm(a, b, c)`` (alpha = beta = 1, a not transposed) → ``Add(MatMul(a, b or bᵀ), c)``: GPT-2's ``Conv1D``
    exports as a 2-D ``Gemm`` between reshapes, which the fusions' reshape elimination leaves with a 3-D input that
    ``Gemm`` refuses (``MatMul`` takes any rank). A constant ``b`` with ``transB=1`` is stored transposed."""
    import numpy as np
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attr = {k: (v.value if hasattr(v, "value") else v) for k, v in node.attributes.items()}
        if attr.get("alpha", 1.0) != 1.0 or attr.get("beta", 1.0) != 1.0 or attr.get("transA", 0):
            continue
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if attr.get("transB", 0):
            if b.const_value is None:
                continue
            arr = np.ascontiguousarray(b.const_value.numpy().T)
            b = ir.Value(name=f"{b.name}_transposed", const_value=ir.tensor(arr))
            b.dtype, b.shape = ir.DataType.from_numpy(arr.dtype), ir.Shape(arr.shape)
            model.graph.register_initializer(b)
        matmul = ir.node("MatMul", [a, b])
        nodes = [matmul]
        out = matmul.outputs[0]
        if c is not None:
            add = ir.node("Add", [out, c])
            nodes.append(add)
            out = add.outputs[0]
        out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
        model.graph.insert_before(node, nodes)
        name, is_output = node.outputs[0].name, node.outputs[0].is_graph_output()
        node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        if is_output:
            node.outputs[0].name, out.name = f"{name}_gemm", name
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _unfuse_skip_layernorm(model) -> int:
    """``SkipLayerNormalization(x, skip, γ, β[, bias])`` → ``LayerNormalization(x + skip [+ bias], γ, β)`` (its
    sum output, where used, is the ``Add``). For ONNX Runtime's CPU provider only: its ``SkipLayerNormalization``
    kernel (onnxruntime 1.32) is ~10× slower than ``Add`` + ``LayerNormalization`` (12 of them at 1 × 128 × 384,
    1 thread: 5.3 ms vs 0.46 ms; at 8 × 128: 55 vs 9 ms — 18 % of all-MiniLM-L6-v2's time). A node whose mean /
    inverse-std outputs are read is left alone."""
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft" or len(node.inputs) < 4:
            continue
        outs = list(node.outputs)
        if any(o.uses() or o.is_graph_output() for o in outs[1:3]) or node.inputs[3] is None:
            continue
        eps = node.attributes.get("epsilon")
        eps = float(eps.value) if eps is not None else 1e-12
        x, skip, gamma, beta = node.inputs[:4]
        nodes = [ir.node("Add", [x, skip])]
        if len(node.inputs) > 4 and node.inputs[4] is not None:
            nodes.append(ir.node("Add", [nodes[-1].outputs[0], node.inputs[4]]))
        total = nodes[-1].outputs[0]
        norm = ir.node("LayerNormalization", [total, gamma, beta], attributes={"axis": -1, "epsilon": eps})
        nodes.append(norm)
        total.dtype, norm.outputs[0].dtype = outs[0].dtype, outs[0].dtype
        total.shape, norm.outputs[0].shape = outs[0].shape, outs[0].shape
        model.graph.insert_before(node, nodes)
        for old, new in ((outs[0], norm.outputs[0]), *(((outs[3], total),) if len(outs) > 3 else ())):
            name, is_output = old.name, old.is_graph_output()
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            if is_output:
                old.name, new.name = f"{name}_skipln", name
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _fuse(model, level: str, target: str) -> str:
    """Run the fusions of ``level`` on an onnx_ir model in place; returns which pipeline ran."""
    _gemm_to_matmul(model)
    pipeline = None
    if level == "all":
        try:
            from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime
        except ImportError:             # transformers without its exporters: onnxscript's fusions alone
            fuse_for_onnxruntime = None
        if fuse_for_onnxruntime is not None:
            fuse_for_onnxruntime(model, target)
            pipeline = f"transformers fuse_for_onnxruntime({target!r})"
    if pipeline is None:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        optimize_for_ort(model)
        pipeline = "onnxscript optimize_for_ort"
    if level == "all" and target == "cpu" and _unfuse_skip_layernorm(model):
        pipeline += " + SkipLayerNormalization → Add + LayerNormalization (CPU kernel)"
    return pipeline


def optimize_file(path: str, level: str, target: str = "cpu", strict: bool = True) -> dict[str, Any]:
    """Fuse the ONNX file at ``path`` in place (``level`` ``"basic"``/``"all"``; ``"none"`` does nothing).

    A fused graph must keep the inputs and outputs and (for ``target="cpu"``) load in ONNX Runtime; ``"all"`` that
    fails is retried as ``"basic"``. When no level works: ``strict`` (the level was asked for) raises
    :class:`ExportError`; otherwise the file stays unfused and ``info["fallback"]`` says why (a warning is logged).
    The file is replaced only by a fused file that loads. Returns ``{"level", "target", "pipeline", "fused":
    {op: count}, "seconds", "fallback"}``."""
    if level not in LEVELS:
        raise ExportError(f"optimize must be one of {LEVELS}, got {level!r}.")
    if target not in TARGETS:
        raise ExportError(f"the optimisation target must be one of {TARGETS}, got {target!r}.")
    info: dict[str, Any] = {"level": level, "target": target, "pipeline": None, "fused": {}, "seconds": 0.0,
                            "fallback": None}
    if level == "none":
        return info
    import onnx

    t = time.perf_counter()
    try:        # the file as torch.onnx wrote it; the fused one has ONNX Runtime's ops, which onnx's checker lacks
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported model: {str(e).splitlines()[0][:300]}") from None
    problems = []
    for lv in ("all", "basic") if level == "all" else (level,):
        try:
            info["pipeline"] = _fuse_into_place(path, lv, target)
        except _Unfusable as e:
            problems.append(f"optimize={lv!r}: {e}")
            continue
        info["level"] = lv
        if problems:
            info["fallback"] = "; ".join(problems)
        break
    else:
        msg = ("the ONNX Runtime fusions could not be applied: " + "; ".join(problems)
               + ". Export with optimize='none'.")
        if strict:
            raise ExportError(msg)
        log.warning("%s The file is written unfused.", msg)
        info.update(level="none", fallback="; ".join(problems))
    info["fused"] = fused_ops(path)
    info["seconds"] = time.perf_counter() - t
    log.info("optimize=%s (%s): %s in %.2fs", info["level"], info["pipeline"], info["fused"], info["seconds"])
    return info


def optimize_kv_attention(path: str, info: dict[str, Any], layout, config: Any = None):
    """For a ``kv_cache=True`` file fused at level ``"all"`` for CPU: each layer's cached attention → ONNX Runtime's
    ``GroupQueryAttention`` (:mod:`peftfx.export._kv_fusion`), the cache in its ``[batch, kv_heads, sequence,
    head_dim]`` layout. Returns the file's cache layout; ``info["kv_attention"]`` says what was done, or why the
    file keeps its unfused attention (a graph the rewrite cannot handle soundly is left unchanged, with a warning)."""
    from ._kv_fusion import KvFusionRefused, fuse_kv_attention

    if info.get("level") != "all" or info.get("target") != "cpu":     # measured and checked on CPU only
        return layout
    t = time.perf_counter()
    try:
        layout, fused = fuse_kv_attention(path, layout, layout.heads, config, check=_loads)
        info["kv_attention"] = {"fused": fused, "layout": layout.to_dict()["layout"]}
        info["fused"] = fused_ops(path)
    except KvFusionRefused as e:
        info["kv_attention"] = {"refused": str(e)}
        log.warning("the key/value-cache attention stays unfused (GroupQueryAttention not applied): %s", e)
    except Exception as e:  # a graph the matcher did not foresee: the file is still unchanged
        first = str(e).splitlines()[0][:200] if str(e) else ""
        info["kv_attention"] = {"refused": f"unexpected {type(e).__name__}: {first}"}
        log.warning("the key/value-cache attention stays unfused (GroupQueryAttention not applied): %s",
                    info["kv_attention"]["refused"], exc_info=log.isEnabledFor(logging.DEBUG))
    info["seconds"] += time.perf_counter() - t
    return layout


class _Unfusable(Exception):
    """One fusion level failed on this graph (the file is unchanged)."""


def _fuse_into_place(path: str, level: str, target: str) -> str:
    import onnx_ir as ir

    data = path + ".data"
    model = ir.load(path)
    if os.path.exists(data):
        ir.external_data.load_to_model(model)       # in memory: the file is rewritten below
    before = _io(model)
    try:
        pipeline = _fuse(model, level, target)
    except Exception as e:  # a fusion library's own error
        raise _Unfusable(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
    if _io(model) != before:
        raise _Unfusable(f"the graph's inputs/outputs changed ({before} → {_io(model)})")
    tmp, tmp_data = path + ".fused.onnx", data + ".fused"
    try:
        if os.path.exists(data):
            ir.save(model, tmp, external_data=os.path.basename(tmp_data))
        else:
            ir.save(model, tmp)
        del model
        if target == "cpu":
            _loads(tmp)
        if os.path.exists(data):
            os.replace(tmp_data, data)
            _relocate(tmp, os.path.basename(data))
        os.replace(tmp, path)
    finally:
        for f in (tmp, tmp_data):
            if os.path.exists(f):
                os.remove(f)
    return pipeline


def _loads(path: str) -> None:
    """ONNX Runtime (CPU, its own graph optimisations on, as in serving) accepts the fused file: every op has a
    kernel and shape inference agrees."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT's Fail / InvalidGraph / RuntimeException
        raise _Unfusable(f"ONNX Runtime cannot load the fused graph: {str(e).splitlines()[0][:200]}") from None


def _relocate(path: str, location: str) -> None:
    """Point every external tensor of the file at ``path`` to ``location`` (the data file was renamed)."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)
