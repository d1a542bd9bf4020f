"""Which matmuls of a float32 ONNX file ``dtype="int8"`` quantizes: the weight products, minus those int8 hurts most.

A *weight matmul* is a ``MatMul`` whose second operand is a 2-D initializer (``x @ W``, ``W`` [in, out]) — every
linear layer, whatever fused op surrounds it. Products of two activations (attention scores, ``probs @ v``) are not
weight matmuls and stay float32, as do ``Gather`` tables (embeddings).

Sensitivity is measured, not guessed from names: the float file runs in ONNX Runtime on a few inputs (the
calibration set, else the export's verification inputs) with every weight matmul's input captured; for each node the
int8 product is simulated in numpy as ONNX Runtime computes it — weights symmetric int8 per output channel (or per
tensor), activations asymmetric 8-bit per tensor with the range of each call (dynamic) or of the whole calibration
set (static) — and compared with the float product: ``error = ‖Q(x)·Q(W) − x·W‖ / ‖x·W‖`` (root mean square,
relative). Nodes past ``Int8.keep_float`` keep float32. On all-MiniLM-L6-v2 the worst are the MLP products of the
first layers, whose inputs carry a few activations 10–20× the rest (the massive activations of special tokens), which
a per-tensor activation scale cannot resolve.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["name_nodes", "sensitivity", "weight_matmuls"]


def name_nodes(proto) -> None:
    """Give every unnamed node a unique name (the quantizer selects nodes by name)."""
    seen = {n.name for n in proto.graph.node if n.name}
    for i, n in enumerate(proto.graph.node):
        if not n.name:
            name = f"peftfx_{n.op_type}_{i}"
            while name in seen:
                name += "_"
            n.name = name
            seen.add(name)


def weight_matmuls(proto) -> list:
    """The ``MatMul`` nodes of the main graph whose second input is a 2-D float initializer."""
    inits = {t.name: t for t in proto.graph.initializer}
    return [n for n in proto.graph.node
            if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.input) == 2
            and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == 1]


def _quant_weight(w: np.ndarray, per_channel: bool) -> np.ndarray:
    scale = np.abs(w).max(0) if per_channel else np.abs(w).max()
    scale = np.where(scale > 0, scale / 127.0, 1.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


def _quant_act(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        return x
    scale = (hi - lo) / 255.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def sensitivity(path: str, feeds: Sequence[Mapping[str, np.ndarray]], per_channel: bool, static: bool,
                nodes: Sequence[str] | None = None) -> dict[str, float]:
    """Node name → relative rms error of its int8 product on ``feeds`` (see the module doc). ``nodes``: the weight
    matmuls to measure (default all)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    proto = onnx.load(path)
    targets = [n for n in weight_matmuls(proto) if nodes is None or n.name in nodes]
    if not targets or not feeds:
        return {}
    inputs = list(dict.fromkeys(n.input[0] for n in targets))
    known = {o.name for o in proto.graph.output}
    for name in inputs:
        if name not in known:
            proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
               if t.name in {n.input[1] for n in targets}}
    probe = path[:-len(".onnx")] + ".probe.onnx"
    try:
        onnx.save(proto, probe)
        del proto
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # the captured names must stay
        session = ort.InferenceSession(probe, opts, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        runs = [dict(zip(inputs, session.run(inputs, {k: v for k, v in f.items() if k in wanted}))) for f in feeds]
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    ranges: dict[str, Any] = {}
    if static:
        for name in inputs:
            ranges[name] = (min(float(r[name].min()) for r in runs), max(float(r[name].max()) for r in runs))
    out = {}
    for n in targets:
        w = weights[n.input[1]]
        wq = _quant_weight(w, per_channel)
        err = ref = 0.0
        for r in runs:
            x = r[n.input[0]].reshape(-1, w.shape[0]).astype(np.float32)
            if not x.size:
                continue
            lo, hi = ranges.get(n.input[0], (float(x.min()), float(x.max())))
            y = x @ w
            err += float(((_quant_act(x, lo, hi) @ wq - y) ** 2).sum())
            ref += float((y ** 2).sum())
        out[n.name] = float(np.sqrt(err / ref)) if ref > 0 else 0.0
    return out
