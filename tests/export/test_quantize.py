"""dtype="int8" (dynamic, and static with a calibration set) and the bfloat16 rewrite.

The int8 file is made from the float32 file that export_onnx verified (≤ 1e-4); its accuracy against the unmerged
PyTorch model is measured on the verification inputs (max abs / rel error of the logits, argmax agreement) and
checked again here on new inputs. Stated tolerance (Int8 defaults): max rel error ≤ 0.1 of the logits' scale,
argmax agreement ≥ 0.95; past it the export raises and writes nothing (or warns, on_fail="warn")."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

import peftfx
from peftfx import ExportError, LoRA
from peftfx.export import Runtime, export_onnx
from peftfx.export.quantize import Int8, as_int8, to_bfloat16
from tests import models as M

INT8_REL = 0.1


def _ops(path):
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def bert():
    ex = {"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    pm = peftfx.apply(M.bert(), LoRA(rank=4, alpha=8), ex)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval(), ex


def _rel_error(pm, path, feeds):
    with torch.no_grad():
        ref = pm(**feeds).logits.numpy()
    got = Runtime(path).run({k: v.numpy() for k, v in feeds.items()})["logits"]
    return float(np.abs(got - ref).max() / np.abs(ref).max()), got, ref


def test_dynamic_int8_is_smaller_and_within_tolerance(bert, tmp_path):
    pm, ex = bert
    r = export_onnx(pm, tmp_path / "q.onnx", ex, dtype="int8")
    assert r.dtype == "int8" and r.max_abs < 1e-4          # the float32 stage verified as every export
    q = r.quantization
    assert q["mode"] == "dynamic" and q["ok"] and q["positions"] > 0
    assert q["max_rel"] <= INT8_REL and q["argmax_agreement"] >= 0.95
    assert 0 < q["max_abs"]                                   # int8 really changed the numbers
    ops = _ops(r.path)
    assert ops["MatMulInteger"] > 0 and ops["DynamicQuantizeLinear"] > 0
    # ORT's Attention (q/k/v projection packed inside) unpacked: the projection is an int8 matmul, attention itself
    # MultiHeadAttention with the padding mask's bias (checked on a padded batch below)
    assert q["attention_unpacked"] == 2 and ops["MultiHeadAttention"] == 2 and "Attention" not in ops
    assert ops["MatMulInteger"] == q["quantized"] == 2 * 4 + 2 - len(q["kept_float"])   # qkv, o, up, down; pooler, head
    assert r.size_bytes < 0.8 * q["float32_bytes"]      # weight matmuls int8; embedding tables stay float32
    import onnx

    meta = {p.key: p.value for p in onnx.load(r.path).metadata_props}
    assert meta["peftfx.dtype"] == "int8" and '"mode": "dynamic"' in meta["peftfx.int8"]
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[2, 7:] = 0
    rel, got, ref = _rel_error(pm, r.path, {"input_ids": M.ids(3, 12, seed=9), "attention_mask": mask})
    assert rel <= INT8_REL and got.shape == ref.shape


def test_static_int8_with_calibration(tmp_path):
    ex = {"input_ids": M.ids(2, 8)}
    pm = peftfx.apply(M.llama(), LoRA(rank=4, alpha=8), ex).eval()
    calib = [{"input_ids": M.ids(2, 8, seed=s)} for s in range(4)]
    r = export_onnx(pm, tmp_path / "s.onnx", ex, dtype="int8", quantization=Int8(calibration=calib))
    q = r.quantization
    assert q["mode"] == "static" and q["calibration"] == 4 and q["ok"]
    assert q["max_rel"] <= INT8_REL and q["argmax_agreement"] >= 0.95
    ops = _ops(r.path)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0 and "MatMulInteger" not in ops
    rel, _, _ = _rel_error(pm, r.path, {"input_ids": M.ids(1, 10, seed=3)})
    assert rel <= INT8_REL


def test_past_the_tolerance_raises_and_writes_nothing_or_warns(bert, tmp_path):
    pm, ex = bert
    out = tmp_path / "t.onnx"
    with pytest.raises(ExportError, match=r"too far from PyTorch.*max rel error .* > 1e-06.*Nothing was written"):
        export_onnx(pm, out, ex, dtype="int8", quantization={"max_rel": 1e-6})
    assert os.listdir(tmp_path) == []
    with pytest.warns(UserWarning, match="too far from PyTorch"):
        r = export_onnx(pm, out, ex, dtype="int8", quantization=Int8(max_rel=1e-6, on_fail="warn"))
    assert os.path.exists(out) and r.quantization["ok"] is False


@pytest.mark.parametrize("spec, message", [
    ({"on_fail": "ignore"}, "on_fail must be 'raise' or 'warn'"),
    ({"min_agreement": 2}, r"fraction in \[0, 1\]"),
    ({"max_rel": 0}, "max_rel must be > 0"),
    ({"calibration": {"input_ids": 1}}, "non-empty list of input dicts"),
    ({"calibration": []}, "non-empty list of input dicts"),
    ({"bits": 4}, r"unknown field\(s\) \['bits'\]"),
    ("dynamic", "must be an Int8"),
])
def test_bad_int8_options(spec, message):
    with pytest.raises(ExportError, match=message):
        as_int8(spec)


def test_bfloat16_rewrite_of_a_float16_graph(tmp_path):
    """CPU-checkable part of dtype='bfloat16' (ORT's CPU provider has no bfloat16 matmul): every float16 tensor,
    cast and initializer becomes bfloat16 (round to nearest even), float32 inputs and outputs stay."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["x16", "w"], ["y16"]),
         helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "w")],
        value_info=[helper.make_tensor_value_info("x16", TensorProto.FLOAT16, [2, 4])])
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    to_bfloat16(path)
    m = onnx.load(path)
    onnx.checker.check_model(m)
    assert m.graph.node[0].attribute[0].i == TensorProto.BFLOAT16 and m.graph.node[2].attribute[0].i == TensorProto.FLOAT
    assert m.graph.initializer[0].data_type == TensorProto.BFLOAT16
    assert m.graph.value_info[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    bits = np.frombuffer(m.graph.initializer[0].raw_data, dtype=np.uint16).astype(np.uint32) << 16
    back = bits.view(np.float32).reshape(4, 3)
    ref = w.astype(np.float32)
    assert np.abs(back - ref).max() <= 2 ** -8 * np.abs(ref).max()      # bfloat16 keeps 8 significant bits
    assert np.abs(back - ref).max() > 0


def _one_matmul(path, x_shape, w):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x_shape[0], w.shape[1]])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_sensitivity_simulates_onnx_runtime(tmp_path, per_channel):
    """The numpy simulation behind Int8.keep_float predicts ONNX Runtime's own int8 error of a weight matmul:
    ORT's quantize_dynamic file of one MatMul, run on inputs with a few outlier activations, has a relative rms
    error within 25 % of the simulated one (both measured against the float product)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from peftfx.export._int8_sites import sensitivity

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 32)) * np.linspace(0.05, 2.0, 32)).astype(np.float32)   # channels of unequal range
    x = rng.standard_normal((64, 48)).astype(np.float32)
    x[3, 5] = 40.0                                                  # an outlier that stretches the per-tensor range
    src, dst = str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx")
    _one_matmul(src, x.shape, w)
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel)
    got = Runtime(dst).run({"x": x})["y"]
    ref = x @ w
    ort_err = float(np.sqrt(((got - ref) ** 2).sum() / (ref ** 2).sum()))
    sim = sensitivity(src, [{"x": x}], per_channel=per_channel, static=False)
    assert set(sim) == {"mm"} and ort_err > 1e-3
    assert abs(sim["mm"] - ort_err) <= 0.25 * ort_err, (sim, ort_err)


def test_keep_float_keeps_the_most_sensitive_matmuls_in_float32(bert, tmp_path):
    """Int8(keep_float=t): the weight matmuls whose measured error exceeds t stay float MatMul (named in the report);
    every other weight matmul is int8; a threshold that keeps everything is refused."""
    pm, ex = bert
    full = export_onnx(pm, tmp_path / "all.onnx", ex, dtype="int8", quantization=Int8(keep_float=100.0))
    errors = full.quantization["sensitivity"]
    assert full.quantization["kept_float"] == {} and full.quantization["quantized"] == len(errors) > 4
    assert all(0 < e < 0.5 for e in errors.values())
    n = len(errors)
    t = float(np.median(list(errors.values())))
    r = export_onnx(pm, tmp_path / "k.onnx", ex, dtype="int8", quantization=Int8(keep_float=t, on_fail="warn"))
    kept = r.quantization["kept_float"]
    assert kept == {k: e for k, e in errors.items() if e > t} and 0 < len(kept) < n
    assert r.quantization["quantized"] + len(kept) == n
    ops = _ops(r.path)
    assert ops["MatMulInteger"] == n - len(kept)
    import onnx

    names = {node.name for node in onnx.load(r.path).graph.node if node.op_type == "MatMul"}
    assert set(kept) <= names                                     # the kept nodes are still float MatMuls
    assert r.quantization["ok"] and r.quantization["max_rel"] <= INT8_REL
    with pytest.raises(ExportError, match="no weight matmul is left to quantize"):
        export_onnx(pm, tmp_path / "none.onnx", ex, dtype="int8", quantization=Int8(keep_float=1e-9))
    assert not os.path.exists(tmp_path / "none.onnx")


def test_int8_agreement_on_a_fixed_held_out_set(tmp_path):
    """Argmax agreement of the default int8 file with float32 PyTorch on 64 fixed, padded sequences the export never
    saw, for a small BERT classifier trained on a learnable rule (label = first token mod 4), LoRA merged:
    ≥ 0.95 — a threshold a broken quantization (e.g. the padding mask dropped, or activations clipped) fails."""
    base = M.bert(labels=4)
    train = M.ids(64, 12, seed=11)
    M.train_with_labels(base, train, train[:, 0] % 4, steps=40, lr=3e-3)
    ex = {"input_ids": M.ids(2, 12), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    pm = M.randomise_lora(peftfx.apply(base.eval(), LoRA(rank=4, alpha=8), ex), std=0.05).eval()
    held = M.ids(64, 16, seed=23)
    mask = torch.ones_like(held)
    for i in range(64):
        mask[i, 6 + i % 10:] = 0                       # lengths 6 … 15: the padding mask must reach attention
    with torch.no_grad():
        ref = pm(input_ids=held, attention_mask=mask).logits.numpy()
    assert (ref.argmax(-1) == (held[:, 0] % 4).numpy()).mean() > 0.5      # the classifier learnt something
    r = export_onnx(pm, tmp_path / "q.onnx", ex, dtype="int8")
    got = Runtime(r.path).run({"input_ids": held.numpy(), "attention_mask": mask.numpy()})["logits"]
    agreement = float((got.argmax(-1) == ref.argmax(-1)).mean())
    assert agreement >= 0.95, agreement
    assert np.abs(got - ref).max() <= INT8_REL * np.abs(ref).max()
