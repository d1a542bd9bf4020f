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


def sensitivity(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], per_channel: bool, static: bool,
                nodes: Sequence[str] | None = None, arrays: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Node name → relative rms error of its int8 product on ``feeds`` (see the module doc). ``model``: a file path
    or a ModelProto (< 2 GB; not modified). ``nodes``: the weight matmuls to measure (default all). ``arrays``: a
    dict it fills with the model's large initializers as numpy arrays (name → array), for a caller that needs them
    too. The run's model is the graph with those initializers handed to ONNX Runtime as in-memory buffers
    (:func:`_session`), not the model serialized: on the Llama 4×512 of bench_export 0.4 s instead of 0.8 s."""
    import onnx

    proto = onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model
    targets = [(n.name, n.input[0], n.input[1])
               for n in weight_matmuls(proto) if nodes is None or n.name in nodes]
    if not targets or not feeds:
        return {}
    inputs = list(dict.fromkeys(x for _, x, _ in targets))
    arrays = {} if arrays is None else arrays
    session = _session(proto, inputs, arrays)
    weights = {w: arrays[w] if w in arrays else _to_array(proto, w) for _, _, w in targets}
    del proto
    wanted = {i.name for i in session.get_inputs()}
    runs = [dict(zip(inputs, session.run(inputs, {k: v for k, v in f.items() if k in wanted}))) for f in feeds]
    del session
    ranges: dict[str, Any] = {}
    if static:
        for name in inputs:
            ranges[name] = (min(float(r[name].min()) for r in runs), max(float(r[name].max()) for r in runs))
    out = {}
    for node, x_name, w_name in targets:
        w = weights[w_name]
        wq = _quant_weight(w, per_channel)
        err = ref = 0.0
        for r in runs:
            x = r[x_name].reshape(-1, w.shape[0]).astype(np.float32)
            if not x.size:
                continue
            lo, hi = ranges.get(x_name, (float(x.min()), float(x.max())))
            y = x @ w
            err += float(((_quant_act(x, lo, hi) @ wq - y) ** 2).sum())
            ref += float((y ** 2).sum())
        out[node] = float(np.sqrt(err / ref)) if ref > 0 else 0.0
    return out


def _to_array(proto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


_INLINE_BYTES = 1 << 16      # initializers under this stay in the graph (shape inference reads Split sizes, shapes…)


def _session(proto, extra_outputs: Sequence[str], arrays: dict[str, np.ndarray]):
    """An ONNX Runtime session (CPU, no graph optimization: the captured names must stay) of ``proto``'s main graph
    with ``extra_outputs`` added as graph outputs. Initializers of ≥ 64 KiB go in as external initializers from
    numpy buffers (``SessionOptions.add_external_initializers``; filled into ``arrays``) instead of being serialized
    into the model bytes and parsed back; same graph, same kernels, same outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    lite = onnx.ModelProto()
    lite.ir_version = proto.ir_version
    lite.opset_import.extend(proto.opset_import)
    lite.graph.name = g.name
    lite.graph.node.extend(g.node)
    lite.graph.input.extend(g.input)
    lite.graph.output.extend(g.output)
    known = {o.name for o in g.output}
    for name in extra_outputs:
        if name not in known:
            lite.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    names, values = [], []
    consumed = {i for n in g.node for i in n.input}     # ORT drops unused initializers before taking buffers
    for t in g.initializer:
        arr = arrays.get(t.name)
        nbytes = (int(np.prod(t.dims)) if len(t.dims) else 1) * _NUMPY_TYPES.get(t.data_type, 0)
        if t.name not in consumed or (arr is None and (t.data_location == TensorProto.EXTERNAL
                                                       or nbytes < _INLINE_BYTES)):
            lite.graph.initializer.append(t)        # small, unused, or a type without a numpy twin: as it is
            continue
        if arr is None:
            arr = arrays[t.name] = np.ascontiguousarray(numpy_helper.to_array(t))
        stub = lite.graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "peftfx-in-memory"
        names.append(t.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(arr))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if names:
        opts.add_external_initializers(names, values)
    session = ort.InferenceSession(lite.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    session.peftfx_buffers = values          # the buffers live as long as the session
    return session


_NUMPY_TYPES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8}     # onnx dtype → bytes (float, ints, half, double)


def expose_attention_projections(model) -> int:
    """Rewrite each ONNX Runtime ``Attention`` (input projection packed inside: ``x·[Wq|Wk|Wv] + b``, then
    attention) as ``MatMul`` + ``Add`` + ``Split`` + ``MultiHeadAttention`` on an onnx_ir model, in place, so the
    q/k/v projection becomes a weight matmul that int8 can take (ORT's own ``QAttention`` would drop the attention
    bias input that carries the padding mask). Same arithmetic; only nodes without ``mask_index``, past,
    ``unidirectional`` or rotary are rewritten, and only where the packed weight is a constant (an initializer or a
    ``Concat`` of initializers). Measured on all-MiniLM-L6-v2 (1 thread, int8): 1×128 9.9 → 7.2 ms, 8×128
    112 → 83 ms. Returns the number rewritten."""
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            continue
        ins = [*node.inputs, *([None] * 6)][:6]
        x, w, bias, mask, past, attn_bias = ins
        attrs = {k: v.value for k, v in node.attributes.items()}
        if mask is not None or past is not None or attrs.get("unidirectional", 0) or attrs.get("do_rotary", 0) \
                or len(node.inputs) > 6 or len(node.outputs) > 1:
            continue
        weight = _constant(w)
        if weight is None or weight.ndim != 2:
            continue
        sizes = [int(s) for s in attrs.get("qkv_hidden_sizes") or [weight.shape[1] // 3] * 3]
        packed = _initializer(model, f"{node.name}_qkv_weight", weight)
        nodes = [ir.node("MatMul", [x, packed])]
        if bias is not None:
            nodes.append(ir.node("Add", [nodes[-1].outputs[0], bias]))
        split = ir.node("Split", [nodes[-1].outputs[0],
                                  _initializer(model, f"{node.name}_qkv_sizes", np.array(sizes, np.int64))],
                        attributes={"axis": -1}, num_outputs=3)
        mha_attrs = {"num_heads": attrs["num_heads"]}
        mha_attrs.update({k: attrs[k] for k in ("scale", "mask_filter_value") if k in attrs})
        mha = ir.node("MultiHeadAttention", [*split.outputs, None, None, attn_bias], attributes=mha_attrs,
                      domain="com.microsoft")
        mha.outputs[0].dtype, mha.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
        model.graph.insert_before(node, [*nodes, split, mha])
        name, is_output = node.outputs[0].name, node.outputs[0].is_graph_output()
        node.outputs[0].replace_all_uses_with(mha.outputs[0], replace_graph_outputs=True)
        if is_output:
            node.outputs[0].name, mha.outputs[0].name = f"{name}_packed", name
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _constant(value) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    prod = value.producer()
    if prod is None or prod.op_type != "Concat" or any(i is None or i.const_value is None for i in prod.inputs):
        return None
    return np.concatenate([i.const_value.numpy() for i in prod.inputs], axis=prod.attributes["axis"].value)


def _initializer(model, name: str, array: np.ndarray):
    import onnx_ir as ir

    array = np.ascontiguousarray(array)
    value = ir.Value(name=name, const_value=ir.tensor(array))
    value.dtype, value.shape = ir.DataType.from_numpy(array.dtype), ir.Shape(array.shape)
    model.graph.register_initializer(value)
    return value
