"""peftfx's own dynamic int8 writer (peftfx.export.quantize.quantize_dynamic_matmuls) against ONNX Runtime's
``quantize_dynamic``, the reference it replaces for speed.

Stated tolerance: none — the two files must hold the same nodes (op, name, inputs, outputs, attributes), the same
initializers byte for byte, and run to bitwise-equal outputs in ONNX Runtime; the same matmuls quantized and kept
float. Where the fast path does not apply (static int8; a graph it does not cover) ONNX Runtime's quantizer writes
the file, and the report says which one did (``quantization["quantizer"]``)."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

import peftfx
from peftfx import LoRA
from peftfx.export import Runtime, export_onnx
from peftfx.export.quantize import (
    Int8,
    _int8_weight,
    quantize_dynamic_matmuls,
    quantize_file,
)
from tests import models as M


def _float_file(tmp_path, name, model, ex):
    pm = peftfx.apply(model, LoRA(rank=4, alpha=8), ex)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    r = export_onnx(pm.eval(), tmp_path / f"{name}.onnx", ex)       # fused ("all" on CPU by default), verified
    return str(r.path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    llama_ex = {"input_ids": M.ids(2, 8)}
    bert_ex = {"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    return {"llama": (_float_file(d, "llama", M.llama(), llama_ex), llama_ex),
            "bert": (_float_file(d, "bert", M.bert(), bert_ex), bert_ex)}


def _feeds(ex):
    out = []
    for b, s, seed in ((1, 8, 1), (3, 1, 2), (3, 16, 3)):
        f = {"input_ids": M.ids(b, s, seed=seed).numpy()}
        if "attention_mask" in ex:
            mask = np.ones((b, s), dtype=np.int64)
            mask[-1, s // 2 + 1:] = 0
            f["attention_mask"] = mask
        out.append(f)
    return out


def _nodes(proto):

    return collections.Counter((n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output),
                                tuple(sorted(a.SerializeToString() for a in n.attribute))) for n in proto.graph.node)


def _initializers(proto):
    from onnx import numpy_helper

    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in proto.graph.initializer}


def _both(tmp_path, src, cfg, feeds, monkeypatch):
    fast, ref = str(tmp_path / "fast.onnx"), str(tmp_path / "ort.onnx")
    a = quantize_file(src, fast, cfg, feeds)
    monkeypatch.setenv("PEFTFX_INT8_ORT", "1")
    b = quantize_file(src, ref, cfg, feeds)
    monkeypatch.delenv("PEFTFX_INT8_ORT")
    return fast, ref, a, b


@pytest.mark.parametrize("model", ["llama", "bert"])
@pytest.mark.parametrize("per_channel,keep_float", [(True, 0.05), (False, None), (True, "median")])
def test_fast_dynamic_int8_equals_onnx_runtimes_file(files, tmp_path, monkeypatch, model, per_channel, keep_float):
    """Tiny Llama and BERT (fused; BERT's ORT Attention unpacked): per channel with the default keep_float, per
    tensor quantizing every weight matmul, and a threshold (the median error) that keeps half of them float —
    same nodes, same initializer bytes, same quantized/kept decisions, bitwise-equal outputs."""
    import onnx

    src, ex = files[model]
    feeds = _feeds(ex)
    median = keep_float == "median"
    if median:
        errs = quantize_file(src, str(tmp_path / "probe.onnx"), Int8(keep_float=100.0), feeds)["sensitivity"]
        keep_float = float(np.median(list(errs.values())))
    cfg = Int8(per_channel=per_channel, keep_float=keep_float)
    fast, ref, a, b = _both(tmp_path, src, cfg, feeds, monkeypatch)
    assert a["quantizer"] == "peftfx" and b["quantizer"] == "onnxruntime"
    assert {k: v for k, v in a.items() if k != "quantizer"} == {k: v for k, v in b.items() if k != "quantizer"}
    if median:
        assert 0 < len(a["kept_float"]) < a["quantized"] + len(a["kept_float"])
    pa, pb = onnx.load(fast), onnx.load(ref)
    assert _nodes(pa) == _nodes(pb)
    assert _initializers(pa) == _initializers(pb)
    ops = collections.Counter(n.op_type for n in pa.graph.node)
    assert ops["MatMulInteger"] == a["quantized"] > 0
    ra, rb = Runtime(fast), Runtime(ref)
    for f in feeds:
        ya, yb = ra.run(f), rb.run(f)
        assert ya.keys() == yb.keys()
        for k in ya:
            assert np.array_equal(ya[k], yb[k]), k


def test_int8_weight_matches_onnx_runtimes_per_channel_formulas():
    """Whole-array weight quantization equals ONNX Runtime's column-by-column quantize_data bit for bit, including
    an all-zero column (scale 1.0), a one-signed column, subnormal-range values and values at half steps."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((33, 9)) * np.logspace(-3, 2, 9)).astype(np.float32)
    w[:, 1] = 0.0
    w[:, 2] = np.abs(w[:, 2])
    w[:, 3] = 1e-40
    w[:, 4] = np.arange(33, dtype=np.float32) - 16.5              # ties at .5 steps: round half to even
    q, scale = _int8_weight(w, per_channel=True)
    for c in range(w.shape[1]):
        zp, s, qc = quantize_data(w[:, c].flatten(), TensorProto.INT8, True)
        assert zp == 0 and np.float32(s).tobytes() == scale[c].tobytes(), c
        assert np.array_equal(np.asarray(qc, dtype=np.int8), q[:, c]), c
    zp, s, qt = quantize_data(w.flatten(), TensorProto.INT8, True)
    q1, s1 = _int8_weight(w, per_channel=False)
    assert np.float32(s).tobytes() == s1.tobytes() and np.array_equal(np.asarray(qt, np.int8).reshape(w.shape), q1)


def _tiny(path, names=(), opset=18):
    """x → MatMul(x, w) → y (a 2-D float weight), plus, per ``names``, an extra Identity output with that name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    for n in names:
        nodes.append(helper.make_node("Identity", ["x"], [n], name=f"id_{n}"))
        outs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])], outs,
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return onnx.load(path)


def test_graphs_the_fast_path_does_not_cover_go_to_onnx_runtime(tmp_path):
    """A name the fast path would add already taken (ORT's own quantizer writes an invalid file there), or an opset
    under 11 (ORT quantizes activations with ReduceMin/ReduceMax/QuantizeLinear there): quantize_dynamic_matmuls
    declines and leaves the model untouched; for the old opset quantize_file writes ONNX Runtime's file (reported),
    int8 and within 5 % of the float product's scale."""
    import onnx

    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    for name, kw in (("taken", {"names": ["x_quantized"]}), ("old", {"opset": 10})):
        src = str(tmp_path / f"{name}.onnx")
        proto = _tiny(src, **kw)
        before = proto.SerializeToString()
        assert quantize_dynamic_matmuls(proto, ["mm"], per_channel=True) is False
        assert proto.SerializeToString() == before
        if name == "taken":
            continue
        dst = str(tmp_path / f"{name}.int8.onnx")
        info = quantize_file(src, dst, Int8(keep_float=None))
        assert info["quantizer"] == "onnxruntime" and info["quantized"] == 1
        assert "MatMulInteger" in {n.op_type for n in onnx.load(dst).graph.node}
        y = Runtime(dst).run({"x": x})["y"]
        ref = x @ onnx.numpy_helper.to_array(proto.graph.initializer[0])
        assert np.abs(y - ref).max() <= 0.05 * np.abs(ref).max()
    # the plain graph takes the fast path, with the same outputs as ORT's file bit for bit
    src = str(tmp_path / "plain.onnx")
    _tiny(src)
    info = quantize_file(src, str(tmp_path / "p.onnx"), Int8(keep_float=None))
    assert info["quantizer"] == "peftfx"
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, str(tmp_path / "p_ort.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"])
    assert np.array_equal(Runtime(str(tmp_path / "p.onnx")).run({"x": x})["y"],
                          Runtime(str(tmp_path / "p_ort.onnx")).run({"x": x})["y"])


def test_export_reports_the_quantizer_and_static_stays_on_onnx_runtime(tmp_path):
    """export_onnx(dtype="int8"): dynamic through the fast path, static (calibration set) through ORT's
    quantize_static; both files carry the int8 metadata, written in the same pass."""
    import onnx

    ex = {"input_ids": M.ids(2, 8)}
    pm = peftfx.apply(M.llama(), LoRA(rank=4, alpha=8), ex).eval()
    d = export_onnx(pm, tmp_path / "d.onnx", ex, dtype="int8")
    s = export_onnx(pm, tmp_path / "s.onnx", ex, dtype="int8",
                    quantization=Int8(calibration=[{"input_ids": M.ids(2, 8, seed=k)} for k in range(2)]))
    assert d.quantization["quantizer"] == "peftfx" and s.quantization["quantizer"] == "onnxruntime"
    for r, mode in ((d, "dynamic"), (s, "static")):
        meta = {p.key: p.value for p in onnx.load(r.path).metadata_props}
        assert meta["peftfx.dtype"] == "int8" and f'"mode": "{mode}"' in meta["peftfx.int8"]
        assert r.quantization["ok"] and r.size_bytes == os.path.getsize(r.path)


@pytest.mark.parametrize("inline_bytes", [1 << 16, 1024])
@pytest.mark.parametrize("model", ["llama", "bert"])
def test_sensitivity_run_with_in_memory_weights_equals_the_serialized_model(files, model, inline_bytes, monkeypatch):
    """The sensitivity step's session (large initializers handed over as numpy buffers, small ones inline) captures
    the same activations, bit for bit, as a session of the whole model serialized with those outputs added — so the
    measured errors and the keep_float decisions are those of before."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from peftfx.export import _int8_sites
    from peftfx.export._int8_sites import _session, name_nodes, weight_matmuls
    from peftfx.export.quantize import _load_for_int8

    monkeypatch.setattr(_int8_sites, "_INLINE_BYTES", inline_bytes)     # 1 KiB: (nearly) every weight a buffer
    src, ex = files[model]
    proto, _ = _load_for_int8(src)
    name_nodes(proto)
    inputs = list(dict.fromkeys(n.input[0] for n in weight_matmuls(proto)))
    arrays: dict = {}
    lite = _session(proto, inputs, arrays)
    assert arrays and all(a.nbytes >= inline_bytes for a in arrays.values())   # the weights went in as buffers
    if inline_bytes == 1024:
        inits = {t.name: t for t in proto.graph.initializer}
        assert {w for n in weight_matmuls(proto) if np.prod(inits[w := n.input[1]].dims) * 4 >= 1024} <= set(arrays)
    full = onnx.ModelProto()
    full.CopyFrom(proto)
    for name in inputs:
        full.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(full.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for f in _feeds(ex):
        for a, b in zip(lite.run(inputs, f), ref.run(inputs, f)):
            assert np.array_equal(a, b)
