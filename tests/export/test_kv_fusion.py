"""Fused attention in the key/value-cache file (``optimize="all"``): each layer's cached attention becomes one
ONNX Runtime ``GroupQueryAttention`` with the cache in ``[batch, kv_heads, sequence, head_dim]``.

References: the unfused file (``optimize="none"``) in ONNX Runtime and the PeftModel in PyTorch (full recompute,
no cache). Tolerance 1e-4 (float32; measured ~3e-7). Refusals leave the file byte for byte as it was."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

import peftfx
from peftfx import LoRA, select
from peftfx.export import Runtime, export_onnx
from peftfx.export._kv_fusion import (
    KvFusionRefused,
    cache_shape,
    fuse_kv_attention,
    unsupported_config,
)
from peftfx.export.optimize import fused_ops, optimize_file
from tests import models as M

TOL = 1e-4
STEPS = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = M.lively(M.llama(layers=2, hidden=64, heads=4, kv_heads=2), 0.3)
    ids = M.ids(2, 8)
    pm = peftfx.apply(base, LoRA(rank=4, targets=select.role("attn.q") | select.role("attn.v")), {"input_ids": ids})
    M.randomise_lora(pm)
    d = tmp_path_factory.mktemp("kvfusion")
    reports = {lv: export_onnx(pm, d / f"{lv}.onnx", {"input_ids": ids}, kv_cache=True, source=base, optimize=lv)
               for lv in ("none", "all")}
    pre = d / "all_before_kv.onnx"          # optimize="all"'s pattern fusions, before the cache-attention rewrite
    shutil.copy(reports["none"].path, pre)
    optimize_file(str(pre), "all", "cpu")
    return base, pm.eval(), reports | {"pre": pre}


def _to_bnsh(x, kv):
    b, s, _ = x.shape
    return x.reshape(b, s, kv["kv_heads"], kv["head_dim"]).transpose(0, 2, 1, 3)


def test_fused_op_count_and_layout(files):
    _, _, reports = files
    fused, plain = reports["all"], reports["none"]
    assert fused.optimize["kv_attention"]["fused"] == {"GroupQueryAttention": 2}
    assert fused_ops(fused.path)["GroupQueryAttention"] == 2 == fused.kv_cache["layers"]
    assert "GroupQueryAttention" not in fused_ops(plain.path)
    graph = onnx.load(fused.path).graph
    assert not [n for n in graph.node if n.op_type == "Softmax"]          # no attention left outside the fused op
    assert fused.kv_cache["layout"] == "[batch, kv_heads, sequence, head_dim]"
    assert plain.kv_cache["layout"] == "[batch, sequence, kv_heads*head_dim]"
    assert list(fused.inputs) == list(plain.inputs) and list(fused.outputs) == list(plain.outputs)   # names, order
    assert fused.inputs["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert fused.outputs["present.0.key"] == ["batch", 2, "sequence + past_sequence", 16]
    assert fused.max_abs < TOL                                         # the export's own verification passed


@pytest.mark.parametrize("batch,prompt_len", [(2, 7), (1, 12)])
def test_decode_steps_equal_unfused_file_and_pytorch(files, batch, prompt_len):
    _, pm, reports = files
    rts = {lv: Runtime(reports[lv].path) for lv in ("none", "all")}
    kv = {lv: rt.kv for lv, rt in rts.items()}
    ids = M.ids(batch, prompt_len, seed=5)
    feeds = {lv: {n: np.zeros(cache_shape(kv[lv], batch, 0), np.float32) for n in kv[lv]["inputs"]} for lv in rts}
    cur, seq = ids.numpy(), ids
    for step in range(STEPS + 1):                                       # the prefill, then one-token steps
        out = {lv: rt.run({"input_ids": cur, **feeds[lv]}) for lv, rt in rts.items()}
        np.testing.assert_allclose(out["all"]["logits"], out["none"]["logits"], atol=TOL, rtol=0)
        for name in kv["all"]["outputs"]:
            np.testing.assert_allclose(out["all"][name], _to_bnsh(out["none"][name], kv["none"]), atol=TOL, rtol=0)
            assert out["all"][name].shape[2] == seq.shape[1]
        with torch.no_grad():
            ref = pm(input_ids=seq).logits[:, -cur.shape[1]:].numpy()
        np.testing.assert_allclose(out["all"]["logits"], ref, atol=TOL, rtol=0)
        nxt = out["all"]["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        for lv in rts:
            feeds[lv] = dict(zip(kv[lv]["inputs"], (out[lv][o] for o in kv[lv]["outputs"])))
        cur, seq = nxt, torch.cat([seq, torch.from_numpy(nxt)], 1)


def test_batch1_multi_token_continuation(files):
    """A prompt continued by several tokens over a past (ONNX Runtime's kernel takes this at batch 1)."""
    _, pm, reports = files
    rt = Runtime(reports["all"].path)
    ids = M.ids(1, 10, seed=7)
    first = rt.run({"input_ids": ids[:, :6].numpy(),
                    **{n: np.zeros(cache_shape(rt.kv, 1, 0), np.float32) for n in rt.kv["inputs"]}})
    out = rt.run({"input_ids": ids[:, 6:].numpy(), **{i: first[o] for i, o in zip(rt.kv["inputs"], rt.kv["outputs"])}})
    with torch.no_grad():
        ref = pm(input_ids=ids).logits[:, 6:].numpy()
    np.testing.assert_allclose(out["logits"], ref, atol=TOL, rtol=0)


def test_generate_tokens_equal_pytorch_greedy(files):
    _, pm, reports = files
    prompt = M.ids(2, 5, seed=3)
    got = Runtime(reports["all"].path).generate(prompt, 16)
    plain = Runtime(reports["none"].path).generate(prompt, 16)
    cur = prompt
    with torch.no_grad():
        for _ in range(16):
            cur = torch.cat([cur, pm(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    np.testing.assert_array_equal(got, cur.numpy())
    np.testing.assert_array_equal(got, plain)
    assert min(len(set(row[5:].tolist())) for row in got) >= 4          # a real sequence, not one token repeated


def _layout(reports):
    from peftfx.export._kv import CacheLayout

    kv = reports["none"].kv_cache
    return CacheLayout(kv["layers"], kv["kv_heads"], kv["head_dim"], kv["heads"])


def test_refuses_sliding_window_and_keeps_file(files, tmp_path):
    base, _, reports = files
    path = tmp_path / "m.onnx"
    shutil.copy(reports["pre"], path)
    before = path.read_bytes()

    class Cfg:
        sliding_window = 4
        layer_types = ("sliding_attention", "full_attention")

    assert "sliding-window" in unsupported_config(Cfg())
    assert unsupported_config(base.config) is None
    with pytest.raises(KvFusionRefused, match="sliding-window attention"):
        fuse_kv_attention(str(path), _layout(reports), 4, Cfg())
    assert path.read_bytes() == before


def test_refuses_unknown_op_before_softmax_and_keeps_file(files, tmp_path):
    """Soft-capped scores (a Tanh between q·kᵀ and the softmax) are not GroupQueryAttention's attention."""
    _, _, reports = files
    proto = onnx.load(reports["pre"])
    soft = next(n for n in proto.graph.node if n.op_type == "Softmax")
    tanh = onnx.helper.make_node("Tanh", [soft.input[0]], ["capped_scores"])
    soft.input[0] = "capped_scores"
    nodes = list(proto.graph.node)
    nodes.insert(nodes.index(soft), tanh)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    path = tmp_path / "capped.onnx"
    onnx.save(proto, path)
    before = path.read_bytes()
    with pytest.raises(KvFusionRefused, match="Tanh"):
        fuse_kv_attention(str(path), _layout(reports), 4)
    assert path.read_bytes() == before


def test_rewrite_of_the_pattern_fused_file(files, tmp_path):
    """The pass alone, on optimize="all"'s file: same op count as the export, and the right layout back."""
    _, _, reports = files
    path = tmp_path / "m.onnx"
    shutil.copy(reports["pre"], path)
    layout, fused = fuse_kv_attention(str(path), _layout(reports), 4)
    assert fused == {"GroupQueryAttention": 2} and layout.order == "bnsh"
    assert fused_ops(path) == fused_ops(reports["all"].path)


def test_refuses_wrong_head_count(files, tmp_path):
    _, _, reports = files
    path = tmp_path / "m.onnx"
    shutil.copy(reports["pre"], path)
    with pytest.raises(KvFusionRefused, match="not a multiple"):
        fuse_kv_attention(str(path), _layout(reports), 3)


def test_refused_export_keeps_unfused_attention(tmp_path, caplog):
    """End to end: Mistral (sliding-window attention) exports at optimize="all" with its attention unfused (the
    reason in the report and a warning), the 3-D cache layout, and passes its verification."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    base = M.lively(MistralForCausalLM(MistralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=128, max_position_embeddings=256, sliding_window=4096)).eval(), 0.3, seed=2)
    ids = M.ids(2, 8)
    pm = peftfx.apply(base, LoRA(rank=2, targets=select.role("attn.q")), {"input_ids": ids})
    with caplog.at_level("WARNING"):
        r = export_onnx(pm, tmp_path / "sw.onnx", {"input_ids": ids}, kv_cache=True, source=base, optimize="all")
    assert "sliding-window" in r.optimize["kv_attention"]["refused"]
    assert "GroupQueryAttention" not in fused_ops(r.path)
    assert r.kv_cache["layout"] == "[batch, sequence, kv_heads*head_dim]"
    assert r.max_abs < TOL
    assert any("stays unfused" in m for m in caplog.messages)


def test_batched_multi_token_continuation_is_a_clear_error(files):
    """ONNX Runtime's GroupQueryAttention takes several new tokens over a non-empty past only at batch 1: the
    Runtime raises ExportError naming the kernel's condition (the unfused file runs it)."""
    from peftfx import ExportError

    _, _, reports = files
    rt = Runtime(reports["all"].path)
    ids = M.ids(2, 6, seed=8)
    first = rt.run({"input_ids": ids[:, :3].numpy(),
                    **{n: np.zeros(cache_shape(rt.kv, 2, 0), np.float32) for n in rt.kv["inputs"]}})
    with pytest.raises(ExportError, match="batch_size must be 1 when sequence_length > 1"):
        rt.run({"input_ids": ids[:, 3:].numpy(), **{i: first[o] for i, o in zip(rt.kv["inputs"], rt.kv["outputs"])}})


def test_adapter_inputs_file_fuses_and_verifies(tmp_path):
    """adapter_inputs=True (LoRA parameters as graph inputs) with the cache: the attention fuses, and the export's
    verification (prefill + cached step with the adapter fed, against PyTorch) passes."""
    base = M.lively(M.llama(layers=2, hidden=32, heads=2, kv_heads=1, inter=64), 0.3, seed=4)
    ids = M.ids(2, 8)
    pm = M.randomise_lora(peftfx.apply(base, LoRA(rank=2, targets=select.role("attn.q")), {"input_ids": ids}))
    r = export_onnx(pm, tmp_path / "ai.onnx", {"input_ids": ids}, kv_cache=True, source=base, adapter_inputs=True)
    assert r.optimize["kv_attention"]["fused"] == {"GroupQueryAttention": 2}
    assert r.adapter_inputs and all(n in r.inputs for n in r.adapter_inputs)
    assert {c["case"] for c in r.checks} >= {"batch 2 × seq 8 +1 cached step"}
    assert r.max_abs < TOL


def test_an_unforeseen_error_in_the_rewrite_keeps_the_file_and_says_why(files, tmp_path, monkeypatch, caplog):
    """A graph the matcher did not foresee (here: the rewrite raising IndexError) must not fail the export: the
    file stays byte-identical with its unfused attention, and the report and a warning name the error."""
    from peftfx.export import _kv_fusion
    from peftfx.export.optimize import optimize_kv_attention

    _, _, reports = files
    path = tmp_path / "m.onnx"
    shutil.copy(reports["pre"], path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise IndexError("list index out of range")

    monkeypatch.setattr(_kv_fusion, "_rewrite", boom)
    layout = _layout(reports)
    info = {"level": "all", "target": "cpu", "seconds": 0.0}
    with caplog.at_level("WARNING"):
        out = optimize_kv_attention(str(path), info, layout)
    assert out is layout
    assert info["kv_attention"]["refused"] == "unexpected IndexError: list index out of range"
    assert path.read_bytes() == before
    assert any("stays unfused" in m for m in caplog.messages)


# ------------------------------------------------------------------------------- kv_cache="padded": left-padded batches
@pytest.fixture(scope="module")
def padded(files, tmp_path_factory):
    """kv_cache="padded" files (attention_mask and position_ids inputs) of the same PeftModel, unfused and fused."""
    base, pm, _ = files
    d = tmp_path_factory.mktemp("kvpadded")
    reports = {lv: export_onnx(pm, d / f"{lv}.onnx", {"input_ids": M.ids(2, 8)}, kv_cache="padded", source=base,
                               optimize=lv) for lv in ("none", "all")}
    return base, pm, reports


def _left_padded(batch_lengths, total, seed=11):
    """Token ids (pad id 0) and the mask of a left-padded batch with the given real lengths."""
    ids = M.ids(len(batch_lengths), total, seed=seed).numpy()
    mask = np.zeros_like(ids)
    for r, n in enumerate(batch_lengths):
        mask[r, total - n:] = 1
    return np.where(mask == 1, ids, 0), mask


def test_padded_files_inputs_fusion_and_verification(padded):
    from peftfx.export._kv_fusion import shares_buffers

    _, _, reports = padded
    fused, plain = reports["all"], reports["none"]
    assert fused.optimize["kv_attention"]["fused"] == {"GroupQueryAttention": 2}
    assert list(fused.inputs)[:3] == ["input_ids", "attention_mask", "position_ids"] == list(plain.inputs)[:3]
    assert fused.inputs["attention_mask"] == ["batch", "total_sequence"]
    assert fused.kv_cache["mask_inputs"] == ["attention_mask", "position_ids"]
    assert shares_buffers(fused.path) and not shares_buffers(plain.path)
    for r in (fused, plain):        # the export verified a left-padded batch, row by row, against PyTorch
        padded_checks = [c for c in r.checks if "left-padded" in c["case"]]
        assert len(padded_checks) == 4 and all(c["max_abs"] < TOL for c in padded_checks)


def test_left_padded_steps_equal_pytorch_rows(padded):
    """Prefill and 4 cached steps of a batch of prompts of lengths 9, 4 and 6 (left-padded to 9): each row's logits
    at its real positions equal the PeftModel's on that row alone (no padding, full recompute), in both files."""
    from peftfx.export._kv import mask_feeds

    _, pm, reports = padded
    lengths = (9, 4, 6)
    ids, mask = _left_padded(lengths, 9)
    for lv in ("none", "all"):
        rt = Runtime(reports[lv].path)
        feeds = {n: np.zeros(cache_shape(rt.kv, 3, 0), np.float32) for n in rt.kv["inputs"]}
        cur, m, rows = ids, mask, [torch.from_numpy(ids[r, 9 - n:]) for r, n in enumerate(lengths)]
        for _ in range(STEPS + 1):
            out = rt.run({"input_ids": cur, **mask_feeds(m, cur.shape[1]), **feeds})
            for r, row in enumerate(rows):
                with torch.no_grad():
                    ref = pm(input_ids=row[None]).logits[0].numpy()
                k = min(cur.shape[1], len(row))          # the real positions among this call's tokens
                np.testing.assert_allclose(out["logits"][r, -k:], ref[-k:], atol=TOL, rtol=0)
            nxt = out["logits"][:, -1].argmax(-1).astype(np.int64)
            rows = [torch.cat([row, torch.tensor([t])]) for row, t in zip(rows, nxt)]
            feeds = dict(zip(rt.kv["inputs"], (out[o] for o in rt.kv["outputs"])))
            cur, m = nxt[:, None], np.concatenate([m, np.ones((3, 1), m.dtype)], 1)


def test_left_padded_generate_equals_hf_generate(padded):
    """Runtime.generate on a left-padded batch — the fused file with shared cache buffers (the default), the fused
    file feeding presents back, and the unfused file — gives Hugging Face generate's greedy tokens on the model
    with the adapter merged (peftfx.merge_and_unload), same padding and mask."""
    _, pm, reports = padded
    ids, mask = _left_padded((7, 3, 5), 7, seed=12)
    new = 12
    hf = peftfx.merge_and_unload(pm)
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None).numpy()
    fused = Runtime(reports["all"].path)
    got = fused.generate(ids, new, attention_mask=mask)
    np.testing.assert_array_equal(got, want)
    assert len(fused.step_times) == new
    np.testing.assert_array_equal(fused.generate(ids, new, attention_mask=mask, shared_buffers=False), want)
    np.testing.assert_array_equal(Runtime(reports["none"].path).generate(ids, new, attention_mask=mask), want)
    np.testing.assert_array_equal(Runtime(reports["none"].path, io_binding=True).generate(ids, new,
                                                                                          attention_mask=mask), want)
    assert min(len(set(row[7:].tolist())) for row in got) >= 4          # a real sequence, not one token repeated


def test_shared_buffers_equal_plain_path_with_eos(padded):
    """Shared buffers and the plain loop agree token for token, eos handling included (rows that finish are padded
    with eos; the loop stops when all have)."""
    _, _, reports = padded
    rt = Runtime(reports["all"].path)
    prompt = M.ids(2, 5, seed=3).numpy()
    full = rt.generate(prompt, 10, shared_buffers=False)
    np.testing.assert_array_equal(rt.generate(prompt, 10, shared_buffers=True), full)
    eos = int(full[0, 7])
    a = rt.generate(prompt, 10, eos_token_id=eos, shared_buffers=True)
    b = rt.generate(prompt, 10, eos_token_id=eos, shared_buffers=False)
    np.testing.assert_array_equal(a, b)
    assert (a[0, 7:] == eos).all() and a.shape[1] <= full.shape[1]


def test_padded_generate_refusals(files, padded):
    """Left-padded prompts on a file without a mask input, a right-padded mask, and shared buffers on a file that
    cannot share them are clear errors."""
    from peftfx import ExportError

    _, _, plain_reports = files
    _, _, reports = padded
    ids, mask = _left_padded((5, 3), 5)
    with pytest.raises(ExportError, match="kv_cache='padded'"):
        Runtime(plain_reports["all"].path).generate(ids, 2, attention_mask=mask)
    np.testing.assert_array_equal(Runtime(plain_reports["all"].path).generate(ids, 2, attention_mask=np.ones_like(ids)),
                                  Runtime(plain_reports["all"].path).generate(ids, 2))
    with pytest.raises(ExportError, match="left padding"):
        Runtime(reports["all"].path).generate(ids, 2, attention_mask=mask[:, ::-1])
    with pytest.raises(ExportError, match="cannot share its cache buffers"):
        Runtime(reports["none"].path).generate(ids, 2, attention_mask=mask, shared_buffers=True)
    with pytest.raises(ExportError, match="kv_cache must be"):
        export_onnx(files[1], "x.onnx", {"input_ids": M.ids(2, 4)}, kv_cache="left", source=files[0])


def test_fusion_of_a_mask_input_needs_the_padded_layout(padded, tmp_path):
    """A file with attention_mask/position_ids inputs is fused only as a kv_cache="padded" file (its layout says
    so); otherwise the rewrite refuses and leaves the file byte for byte."""
    from dataclasses import replace

    _, _, reports = padded
    path = tmp_path / "m.onnx"
    shutil.copy(reports["none"].path, path)
    optimize_file(str(path), "all", "cpu")
    before = path.read_bytes()
    layout = _layout(reports)
    with pytest.raises(KvFusionRefused, match="attention_mask"):
        fuse_kv_attention(str(path), layout, 4)
    assert path.read_bytes() == before
    new, fused = fuse_kv_attention(str(path), replace(layout, padded=True), 4)
    assert fused == {"GroupQueryAttention": 2} and new.padded and new.order == "bnsh"


def test_refused_padded_export_serves_left_padded_batches_unfused(tmp_path):
    """Mistral (sliding-window attention: the fusion is refused) exported with kv_cache="padded": the file keeps its
    unfused attention and still serves a left-padded batch — Runtime.generate = Hugging Face generate on the merged
    model, same mask — through the plain loop (no shared buffers for an unfused file)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    base = M.lively(MistralForCausalLM(MistralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=128, max_position_embeddings=256, sliding_window=4096)).eval(), 0.3, seed=2)
    pm = M.randomise_lora(peftfx.apply(base, LoRA(rank=2, targets=select.role("attn.q")), {"input_ids": M.ids(2, 8)}))
    r = export_onnx(pm, tmp_path / "sw.onnx", {"input_ids": M.ids(2, 8)}, kv_cache="padded", source=base)
    assert "sliding-window" in r.optimize["kv_attention"]["refused"]
    assert "GroupQueryAttention" not in fused_ops(r.path) and "attention_mask" in r.inputs
    ids, mask = _left_padded((6, 2, 4), 6, seed=13)
    with torch.no_grad():
        want = peftfx.merge_and_unload(pm.eval()).generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=10, min_new_tokens=10,
            do_sample=False, pad_token_id=0, eos_token_id=None).numpy()
    rt = Runtime(r.path)
    np.testing.assert_array_equal(rt.generate(ids, 10, attention_mask=mask), want)
    assert not rt._shares_buffers()
