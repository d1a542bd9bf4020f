"""The optimisation stage of export_onnx (optimize="none|basic|all"), provider reporting and the run/bench commands.

Every optimised file is verified by export_onnx in ONNX Runtime against the unmerged PyTorch model (float32
tolerance 1e-4 of the output scale) and checked again here on a fresh session and a new shape; the fused ONNX
Runtime ops are counted where fusion is claimed (tiny BERT: Attention, SkipLayerNormalization, BiasGelu per layer;
tiny Llama: MultiHeadAttention / RotaryEmbedding, SkipSimplifiedLayerNormalization)."""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
import torch

import peftfx
from peftfx import ExportError, LoRA, select
from peftfx.cli import main
from peftfx.export import Runtime, export_onnx
from peftfx.export import optimize as O
from peftfx.export import runtime as R
from tests import models as M

F32_TOL = 1e-4
LAYERS = 2


def _ops(path):
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def _check_fresh(pm, path, feeds):
    """A fresh Runtime on a shape not used by the export's verification, against the unmerged PyTorch model."""
    pm.eval()
    with torch.no_grad():
        ref = pm(**feeds).logits.numpy()
    got = Runtime(path).run({k: v.numpy() for k, v in feeds.items()})["logits"]
    assert np.abs(got - ref).max() <= F32_TOL * max(1.0, np.abs(ref).max())


@pytest.fixture(scope="module")
def bert():
    ex = {"input_ids": M.ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    return M.randomise_lora(peftfx.apply(M.bert(layers=LAYERS), LoRA(rank=4, alpha=8), ex)), ex


@pytest.fixture(scope="module")
def llama():
    ex = {"input_ids": M.ids(2, 8)}
    return M.randomise_lora(peftfx.apply(M.llama(layers=LAYERS), LoRA(rank=4, alpha=8), ex)), ex


def test_bert_basic_fuses_attention_norms_and_gelu(bert, tmp_path):
    pm, ex = bert
    report = export_onnx(pm, tmp_path / "b.onnx", ex, optimize="basic")
    assert report.max_abs < F32_TOL and all(c["ok"] for c in report.checks) and len(report.checks) == 3
    fused = O.fused_ops(report.path)
    # one Attention (q/k/v packed) per layer; a SkipLayerNormalization after attention and after the MLP; BiasGelu
    assert fused == {"Attention": LAYERS, "BiasGelu": LAYERS, "SkipLayerNormalization": 2 * LAYERS}
    assert report.optimize["level"] == "basic" and report.optimize["fused"] == fused
    assert "Softmax" not in _ops(report.path)                # attention is really inside the fused op
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0                                          # padding: the fused Attention takes the mask
    _check_fresh(pm, report.path, {"input_ids": M.ids(3, 13, seed=5), "attention_mask": mask})


def test_bert_all_on_cpu_unfuses_skip_layernorm(bert, tmp_path):
    """optimize="all" for CPU: the basic fusions, then each SkipLayerNormalization back into Add (+ bias) +
    LayerNormalization, whose ORT CPU kernels are ~10× faster (bench: sln micro-benchmark in optimize.py's doc);
    the result equals PyTorch (≤ 1e-4) on padded batches too."""
    pm, ex = bert
    r = export_onnx(pm, tmp_path / "a.onnx", ex, optimize="all")
    assert r.optimize["level"] == "all" and "LayerNormalization (CPU kernel)" in r.optimize["pipeline"]
    assert r.optimize["fused"] == {"Attention": LAYERS, "BiasGelu": LAYERS}
    assert _ops(r.path)["LayerNormalization"] == 2 * LAYERS + 1          # + the embeddings' LayerNorm
    assert r.max_abs < F32_TOL and all(c["ok"] for c in r.checks)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    _check_fresh(pm, r.path, {"input_ids": M.ids(3, 13, seed=5), "attention_mask": mask})


def test_llama_levels_fuse_and_match_pytorch(llama, tmp_path):
    pm, ex = llama
    basic = export_onnx(pm, tmp_path / "basic.onnx", ex, optimize="basic")
    # the final RMSNorm becomes ORT's SimplifiedLayerNormalization (an ORT op in the default domain)
    assert O.fused_ops(basic.path) == {"MultiHeadAttention": LAYERS, "SimplifiedLayerNormalization": 1,
                                       "SkipSimplifiedLayerNormalization": 2 * LAYERS}
    full = export_onnx(pm, tmp_path / "all.onnx", ex)                # default: "all" for float32
    assert full.optimize["level"] == "all" and full.optimize["target"] == "cpu"
    # transformers' CPU pipeline keeps rotary fused and turns MultiHeadAttention back into matmuls (ORT's CPU
    # kernel is slower, microsoft/onnxruntime#33873)
    assert O.fused_ops(full.path) == {"RotaryEmbedding": 2 * LAYERS, "SimplifiedLayerNormalization": 1,
                                      "SkipSimplifiedLayerNormalization": 2 * LAYERS}
    for r in (basic, full):
        assert r.max_abs < F32_TOL and all(c["ok"] for c in r.checks)
        _check_fresh(pm, r.path, {"input_ids": M.ids(3, 11, seed=7)})
    import onnx

    meta = {p.key: p.value for p in onnx.load(full.path).metadata_props}
    assert meta["peftfx.optimize"] == "all" and meta["peftfx.dtype"] == "float32"


def test_gpt2_conv1d_gemm_is_fused_and_adapter_inputs_survive(tmp_path):
    ids = M.ids(2, 8)
    pm = M.randomise_lora(peftfx.apply(M.gpt2(), LoRA(rank=4, alpha=8, targets=select.role("attn.qkv")),
                                      {"input_ids": ids}))
    # GPT-2's Conv1D exports as a 2-D Gemm; fused as is, ORT refuses the graph (rank-3 input): rewritten to MatMul
    r = export_onnx(pm, tmp_path / "g.onnx", {"input_ids": ids}, optimize="basic")
    assert r.optimize["fallback"] is None and r.optimize["fused"]["SkipLayerNormalization"] == 2 * LAYERS
    assert "Gemm" not in _ops(r.path) and r.max_abs < F32_TOL
    # "all" on CPU: the same graph with SkipLayerNormalization back in Add + LayerNormalization (faster CPU kernel)
    r = export_onnx(pm, tmp_path / "g.onnx", {"input_ids": ids}, optimize="all")
    assert r.optimize["fallback"] is None and r.optimize["fused"] == {} and r.max_abs < F32_TOL
    assert _ops(r.path)["LayerNormalization"] == 2 * LAYERS + 1 and "Gemm" not in _ops(r.path)
    # adapters kept as graph inputs: verification fed the trained adapter and the zero defaults (base model)
    a = export_onnx(pm, tmp_path / "ga.onnx", {"input_ids": ids}, adapter_inputs=True, optimize="all")
    assert a.adapter_inputs and set(a.adapter_inputs) <= set(a.inputs)
    assert any(c["case"].endswith("no adapter") for c in a.checks) and all(c["ok"] for c in a.checks)
    assert a.optimize["fused"] == {} and _ops(a.path)["LayerNormalization"] == 2 * LAYERS + 1


def test_bad_options_are_refused_before_anything_is_written(llama, tmp_path):
    pm, ex = llama
    out = tmp_path / "x.onnx"
    cases = [({"optimize": "fast"}, "optimize must be one of"),
             ({"dtype": "int4"}, "dtype must be one of"),
             ({"quantization": {"per_channel": True}}, "applies to dtype='int8' only"),
             ({"dtype": "int8", "adapter_inputs": True}, "float32/float16 only"),
             ({"dtype": "bfloat16"}, "CUDA provider only")]
    for kwargs, message in cases:
        with pytest.raises(ExportError, match=message):
            export_onnx(pm, out, ex, **kwargs)
        assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_failed_fusion_falls_back_by_default_and_raises_when_asked(llama, tmp_path, monkeypatch, caplog):
    pm, ex = llama

    def broken(model, level, target):
        raise RuntimeError("pattern engine exploded")

    monkeypatch.setattr(O, "_fuse", broken)
    r = export_onnx(pm, tmp_path / "d.onnx", ex, verify=False)
    assert r.optimize["level"] == "none" and "pattern engine exploded" in r.optimize["fallback"]
    assert O.fused_ops(r.path) == {} and "could not be applied" in caplog.text
    with pytest.raises(ExportError, match="optimize='basic': RuntimeError: pattern engine exploded.*optimize='none'"):
        export_onnx(pm, tmp_path / "e.onnx", ex, optimize="basic", verify=False)
    assert not os.path.exists(tmp_path / "e.onnx")


def test_default_level_per_dtype_and_device():
    assert O.resolve_level(None, "float32", None) == ("all", "cpu")
    assert O.resolve_level(None, "int8", "cpu") == ("all", "cpu")
    assert O.resolve_level(None, "float16", None) == ("none", "cpu")     # ORT's CPU fused kernels are float32
    assert O.resolve_level(None, "float16", "cuda") == ("all", "cuda")
    assert O.resolve_level("basic", "bfloat16", None) == ("basic", "cuda")


def test_runtime_says_which_provider_and_why(llama, tmp_path, monkeypatch):
    import onnxruntime as ort

    pm, ex = llama
    path = export_onnx(pm, tmp_path / "p.onnx", ex, optimize="none", verify=False).path
    rt = Runtime(path)
    assert rt.provider == "CPUExecutionProvider" == rt.providers[0]
    cuda_build = "CUDAExecutionProvider" in ort.get_available_providers()
    if not cuda_build and not R.gpu_present():
        assert rt.provider_reason == ("CUDAExecutionProvider not available: onnxruntime CPU build installed and no "
                                      "GPU visible")
    assert Runtime(path, device="cpu").provider_reason == "device='cpu' asked for"
    assert rt.session_seconds > 0 and "CPUExecutionProvider" in repr(rt)
    if not cuda_build:
        monkeypatch.setattr(R, "gpu_present", lambda: True)     # a GPU, but the CPU build of onnxruntime
        providers, why = R.provider_choice(None)
        assert providers == ["CPUExecutionProvider"] and "pip install 'peftfx[gpu]'" in why
        with pytest.raises(ExportError, match=r"install the GPU build: .*peftfx\[gpu\]"):
            Runtime(path, device="cuda")


def test_cli_run_output_equals_runtime_and_bench_times_the_file(llama, tmp_path, capsys):
    pm, ex = llama
    path = str(export_onnx(pm, tmp_path / "c.onnx", ex, optimize="none", verify=False).path)
    out = tmp_path / "logits.npy"
    assert main(["run", path, "--ids", "1 2 3 4 5", "--ids", "6 7 8 9 10", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["timings_s"]) == {"load + session", "session create", "inputs", "run"}
    assert printed["provider_reason"] and printed["output"].endswith("(logits)")
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], dtype=np.int64)
    np.testing.assert_array_equal(np.load(out), Runtime(path).run(input_ids=ids)["logits"])
    with torch.no_grad():
        ref = pm.eval()(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.load(out) - ref).max() < F32_TOL
    assert main(["run", path, "--ids", "1 2", "--output", str(tmp_path / "x.txt")]) == 2
    assert "must end with .npy" in capsys.readouterr().err and not os.path.exists(tmp_path / "x.txt")
    assert main(["bench", path, "--shape", "1x8", "--shape", "2x4", "--repeats", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["shape"] for r in res["rows"]] == ["1x8", "2x4"] and res["eager_source"] is None
    assert all(r["median_ms"]["onnxruntime"] > 0 for r in res["rows"])
    # with a PyTorch reference (a factory here; a recorded source folder by default): ratio = ORT / eager
    assert main(["bench", path, "--model", "tests.models:llama", "--shape", "1x8", "--repeats", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["ort/eager"] == pytest.approx(row["median_ms"]["onnxruntime"] / row["median_ms"]["pytorch_eager"])
    assert main(["bench", path, "--shape", "1by8"]) == 2
    assert "BATCHxSEQUENCE" in capsys.readouterr().err
