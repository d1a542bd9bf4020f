"""export_onnx reuses the traced graph: the ExportedProgram is built from the merged graph (no second torch.export)
and the exporter's whole-graph decomposition is skipped when every op translates (ops without a translation are
rewritten node by node). The file must behave as the one today's route (``PEFTFX_EXPORT_REUSE=0``: a fresh
torch.export, the exporter's decompositions) writes: both run in ONNX Runtime at two shapes other than the example's
agree within 1e-5, and both match PyTorch within the export tolerance."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import peftfx
from peftfx import LoRA, select
from peftfx.export import Runtime, export_onnx
from peftfx.export._build import rewrite_untranslatable
from tests import models as M

SAME = 1e-5           # the reused route's file vs today's, same inputs, ORT both
F32_TOL = 1e-4        # either file vs PyTorch, relative to the output scale (export_onnx's own tolerance)


def _both(pm, ex, tmp_path, monkeypatch, caplog):
    """(report, path) of the reused route and of today's route for the same model."""
    with caplog.at_level(logging.INFO, logger="peftfx.export.onnx"):
        new = export_onnx(pm, tmp_path / "reused.onnx", ex, optimize="none")
    logged = caplog.text
    monkeypatch.setenv("PEFTFX_EXPORT_REUSE", "0")
    old = export_onnx(pm, tmp_path / "fresh.onnx", ex, optimize="none")
    monkeypatch.delenv("PEFTFX_EXPORT_REUSE")
    return new, old, logged


def _compare(pm, new, old, shapes, feeds):
    pm.eval()
    a, b = Runtime(new.path), Runtime(old.path)
    for batch, seq in shapes:
        x = feeds(batch, seq)
        with torch.no_grad():
            ref = pm(**x)
        ref = (ref.logits if hasattr(ref, "logits") else ref).numpy()
        got_new, got_old = a.run(**x)["logits"], b.run(**x)["logits"]
        assert got_new.shape == ref.shape
        assert np.abs(got_new - got_old).max() <= SAME, (batch, seq)
        assert np.abs(got_new - ref).max() <= F32_TOL * max(1.0, np.abs(ref).max()), (batch, seq)


def _reused(report, logged):
    """The new route ran: the program came from the traced graph and the decomposition re-trace was skipped."""
    assert "program from graph" in report.stages and "torch.export" not in report.stages
    assert "onnx rewrite" in report.stages
    assert "decompositions run" not in logged and "fresh torch.export" not in logged


def test_llama_reused_file_equals_fresh_export(tmp_path, monkeypatch, caplog):
    base = M.llama()
    ids = M.ids(2, 8)
    pm = peftfx.apply(base, LoRA(rank=4, alpha=8, targets=select.role("attn.q") | select.role("attn.v")),
                      {"input_ids": ids})
    M.randomise_lora(pm)
    new, old, logged = _both(pm, {"input_ids": ids}, tmp_path, monkeypatch, caplog)
    _reused(new, logged)
    assert "torch.export" in old.stages and "program from graph" not in old.stages
    assert new.inputs == old.inputs == {"input_ids": ["batch", "sequence"]}
    assert new.outputs == old.outputs
    assert [c["case"] for c in new.checks] == [c["case"] for c in old.checks] and new.max_abs < F32_TOL
    _compare(pm, new, old, [(3, 5), (1, 19)], lambda b, s: {"input_ids": M.ids(b, s, seed=b + s)})


def test_bert_with_mask_reused_file_equals_fresh_export(tmp_path, monkeypatch, caplog):
    base = M.bert()
    ids = M.ids(2, 8)
    ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pm = peftfx.apply(base, LoRA(rank=4, alpha=8, targets=select.role("attn.q") | select.role("attn.v")), ex)
    M.randomise_lora(pm)
    new, old, logged = _both(pm, ex, tmp_path, monkeypatch, caplog)
    _reused(new, logged)
    assert new.inputs == old.inputs == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}

    def feeds(b, s):
        x = M.ids(b, s, seed=b * s)
        mask = torch.ones_like(x)
        mask[0, s // 2:] = 0                      # padding in the first row
        return {"input_ids": x, "attention_mask": mask}

    _compare(pm, new, old, [(3, 5), (1, 23)], feeds)


def test_unmerged_adapter_falls_back_to_a_fresh_export(tmp_path, caplog):
    """Houlsby adapters stay modules after merge (call_module nodes): the graph is not reused, the log says why, and
    the file is today's route's, verified."""
    ids = M.ids(2, 8)
    pm = peftfx.apply(M.llama(), peftfx.Houlsby(bottleneck=8), {"input_ids": ids})
    with caplog.at_level(logging.INFO, logger="peftfx.export.onnx"):
        r = export_onnx(pm, tmp_path / "h.onnx", {"input_ids": ids}, optimize="none")
    assert "the traced graph cannot be reused" in caplog.text and "submodule" in caplog.text
    assert "torch.export" in r.stages and "program from graph" not in r.stages
    assert r.checks and r.max_abs < F32_TOL


class _Ops(nn.Module):
    """Every op rewrite_untranslatable rewrites, on symbolic sizes."""

    def forward(self, x, m):
        a = x.to(torch.float64).to(torch.float32)          # aten.to.dtype
        b = (m > 0) & (x > 0)                               # __and__.Tensor
        c = (m > 0) | (x < 0)                               # __or__.Tensor
        d = torch.diff(x, dim=-1, prepend=x[:, :1])         # diff with prepend
        e = torch.diff(b, dim=1)                            # diff of booleans
        f = torch.min(x, a * 2)                             # min.other
        return a + d + f + b.float() + c.float(), e


def test_rewrite_untranslatable_is_exact():
    from torch.export import Dim
    from torch.onnx._internal.exporter import _registration

    x, m = torch.randn(3, 7), torch.randn(3, 7)
    ep = torch.export.export(_Ops(), (x, m), dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},) * 2, strict=False)
    registry = _registration.ONNXRegistry.from_torchlib(opset_version=18)
    before = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"aten.to.dtype", "aten.__and__.Tensor", "aten.diff.default"} <= before
    x2, m2 = torch.randn(5, 11), torch.randn(5, 11)
    ref = ep.module()(x2, m2)
    assert rewrite_untranslatable(ep.graph_module, registry.is_registered) >= 6
    ep.graph_module.graph.lint()
    left = {n.target for n in ep.graph.nodes if n.op == "call_function" and not registry.is_registered(n.target)}
    assert left <= {torch.ops.aten._assert_tensor_metadata.default}       # removed by the exporter itself
    got = ep.module()(x2, m2)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # fake values stay symbolic: the rewritten diff's size is the input's, less one, for any size
    diff = next(n for n in ep.graph.nodes if n.target is torch.ops.aten.ne.Tensor)
    assert isinstance(diff.meta["val"].shape[1], torch.SymInt)


@pytest.mark.parametrize("shape", [(1, 8)])
def test_batch_one_example_reused(tmp_path, shape, caplog):
    """A batch-1 example (torch.export would specialise the size 1): the reused graph keeps the trace's symbolic
    batch, and the file runs at batch 4."""
    ids = M.ids(*shape)
    pm = peftfx.apply(M.llama(), LoRA(rank=4, targets=select.role("attn.q")), {"input_ids": ids})
    M.randomise_lora(pm)
    with caplog.at_level(logging.INFO, logger="peftfx.export.onnx"):
        r = export_onnx(pm, tmp_path / "b1.onnx", {"input_ids": ids}, optimize="none")
    _reused(r, caplog.text)
    x = M.ids(4, 6, seed=3)
    with torch.no_grad():
        ref = pm.eval()(input_ids=x).logits.numpy()
    assert np.abs(Runtime(r.path).run(input_ids=x)["logits"] - ref).max() <= F32_TOL * max(1.0, np.abs(ref).max())


def test_bert_position_limit_carried_over(tmp_path, caplog):
    """The trace's range constraints travel with the reused graph: BERT's 512 positions bound the long verification
    case (2 × 300 tokens would be past the position table)."""
    ids = M.ids(2, 300)
    ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pm = peftfx.apply(M.bert(), LoRA(rank=4, targets=select.role("attn.v")), ex)
    with caplog.at_level(logging.INFO, logger="peftfx.export.onnx"):
        r = export_onnx(pm, tmp_path / "long.onnx", ex, optimize="none")
    _reused(r, caplog.text)
    assert "batch 3 × seq 512" in {c["case"] for c in r.checks} and r.max_abs < F32_TOL


def test_inputs_of_another_dtype_give_a_file_of_that_dtype(tmp_path, caplog):
    """int32 token ids at export time, int64 at apply time: the graph exported is the one for the given inputs
    (peftfx.variants traces it), so the file takes int32 ids and matches PyTorch."""
    import onnx

    ids = M.ids(2, 8)
    pm = peftfx.apply(M.llama(), LoRA(rank=4, targets=select.role("attn.q")), {"input_ids": ids})
    M.randomise_lora(pm)
    with caplog.at_level(logging.INFO, logger="peftfx.export.onnx"):
        r = export_onnx(pm, tmp_path / "i32.onnx", {"input_ids": ids.int()}, optimize="none")
    _reused(r, caplog.text)
    elem = onnx.load(r.path).graph.input[0].type.tensor_type.elem_type
    assert elem == onnx.TensorProto.INT32 and r.max_abs < F32_TOL
    x = M.ids(3, 5, seed=7)
    with torch.no_grad():
        ref = pm.eval()(input_ids=x).logits.numpy()
    got = Runtime(r.path).run(input_ids=x.int())["logits"]
    assert np.abs(got - ref).max() <= F32_TOL * max(1.0, np.abs(ref).max())


def test_program_from_graph_refuses_inputs_unlike_the_trace():
    from peftfx.export._build import NotReusable, program_from_graph

    ids = M.ids(2, 8)
    pm = peftfx.apply(M.llama(), LoRA(rank=4, targets=select.role("attn.q")), {"input_ids": ids})
    work = peftfx.merge(pm)
    axes = [{0: "batch", 1: "sequence"}]
    with pytest.raises(NotReusable, match="torch.int32 .* the trace took torch.int64"):
        program_from_graph(work, {"input_ids": ids.int()}, ["input_ids"], axes, 1)
    with pytest.raises(NotReusable, match="calls the submodule"):        # unmerged LoRA: a module call
        program_from_graph(pm, {"input_ids": ids}, ["input_ids"], axes, 1)
    ep, _ = program_from_graph(work, {"input_ids": ids}, ["input_ids"], axes, 1)
    x = M.ids(3, 5, seed=2)
    with torch.no_grad():           # the program computes what the merged model computes, at another shape
        assert torch.allclose(ep.module()(x)[0], work.eval()(input_ids=x).logits, atol=1e-6)


def test_falcon_inplace_add_reused_decompositions_run(tmp_path, monkeypatch, caplog):
    """Falcon's ``mlp_output += attention_output`` (an in-place add on a fresh tensor) becomes an out-of-place add so
    the graph is reused; its ``aten.numpy_T`` has no ONNX translation, so the exporter's decompositions run (logged).
    The file equals today's route's in ORT within 1e-5 at two other shapes."""
    ids = M.ids(2, 8)
    pm = peftfx.apply(M.falcon(), LoRA(rank=4, targets=select.role("attn.qkv")), {"input_ids": ids})
    M.randomise_lora(pm)
    new, old, logged = _both(pm, {"input_ids": ids}, tmp_path, monkeypatch, caplog)
    assert "program from graph" in new.stages and "torch.export" not in new.stages
    assert "decompositions run: aten.numpy_T.default has no ONNX translation" in logged
    _compare(pm, new, old, [(3, 5), (1, 17)], lambda b, s: {"input_ids": M.ids(b, s, seed=b + s)})


def test_t5_encoder_decoder_reused(tmp_path, caplog):
    """T5 (separate encoder and decoder lengths, an in-place ``position_bias +=``): reused, no decomposition
    re-trace, and the file matches PyTorch with a source shorter and one longer than the target."""
    ids = M.ids(2, 8)
    ex = {"input_ids": ids, "decoder_input_ids": M.ids(2, 5, seed=3)}
    pm = peftfx.apply(M.t5(), LoRA(rank=4, targets=select.role("attn.q") | select.role("attn.v")), ex)
    M.randomise_lora(pm)
    with caplog.at_level(logging.INFO, logger="peftfx.export.onnx"):
        r = export_onnx(pm, tmp_path / "t5.onnx", ex, optimize="none")
    _reused(r, caplog.text)
    assert r.inputs == {"input_ids": ["batch", "sequence"], "decoder_input_ids": ["batch", "decoder_sequence"]}
    rt = Runtime(r.path)
    pm.eval()
    for src, tgt in ((3, 9), (12, 4)):
        x = {"input_ids": M.ids(2, src, seed=src), "decoder_input_ids": M.ids(2, tgt, seed=tgt)}
        with torch.no_grad():
            ref = pm(**x).logits.numpy()
        got = rt.run(**x)["logits"]
        assert np.abs(got - ref).max() <= F32_TOL * max(1.0, np.abs(ref).max())
