"""Greedy generation in ONNX Runtime with the key/value cache graph equals PyTorch token for token (GPT-2 and
Llama, 32 new tokens, LoRA merged): against a full-recompute loop over the PeftModel and against Hugging Face's
own ``generate`` on the model with the adapter merged in."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import peftfx
from peftfx import LoRA, select
from peftfx.export import Runtime, export_onnx
from tests import models as M

NEW = 32


def _greedy_pytorch(pm, prompt, n):
    """No cache: the whole sequence is recomputed for every token."""
    cur = prompt
    with torch.no_grad():
        for _ in range(n):
            cur = torch.cat([cur, pm(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return cur.numpy()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory):
    arch = request.param
    base = M.lively(getattr(M, arch)(), 0.5)
    ids = M.ids(2, 8)
    targets = select.role("attn.qkv") if arch == "gpt2" else select.role("attn.q") | select.role("attn.v")
    pm = peftfx.apply(base, LoRA(rank=4, alpha=8, targets=targets), {"input_ids": ids})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp(arch) / f"{arch}.onnx"
    # the default optimize="all": GPT-2 and Llama cache files take the fused cached attention (checked below)
    report = export_onnx(pm, path, {"input_ids": ids}, kv_cache=True, source=base)
    return arch, base, pm.eval(), report


def test_cache_graph_io_and_verification(exported):
    arch, base, pm, report = exported
    layers = base.config.num_hidden_layers if arch == "llama" else base.config.n_layer
    assert report.kv_cache["layers"] == layers == 2
    kv, hd = report.kv_cache["kv_heads"], report.kv_cache["head_dim"]
    # the default optimize="all" rewrites the cached attention to GroupQueryAttention: its cache layout
    assert report.kv_cache["layout"] == "[batch, kv_heads, sequence, head_dim]"
    assert report.optimize["kv_attention"]["fused"] == {"GroupQueryAttention": layers}
    assert report.inputs["past_key_values.0.key"] == ["batch", kv, "past_sequence", hd]
    assert report.outputs["present.1.value"] == ["batch", kv, "sequence + past_sequence", hd]
    assert {c["case"] for c in report.checks} >= {"batch 2 × seq 8 prefill", "batch 2 × seq 8 +1 cached step",
                                                  "batch 1 × seq 16 prefill", "batch 1 × seq 16 +1 cached step"}
    assert report.max_abs < 1e-4


def test_greedy_tokens_equal_pytorch(exported):
    arch, base, pm, report = exported
    prompt = M.ids(2, 5, seed=3)
    rt = Runtime(report.path)
    got = rt.generate(prompt, NEW)
    want = _greedy_pytorch(pm, prompt, NEW)
    assert got.shape == (2, 5 + NEW)
    np.testing.assert_array_equal(got, want)
    assert min(len(set(row[5:].tolist())) for row in got) >= 8          # a real sequence, not one token repeated
    assert len(rt.step_times) == NEW                                    # one prefill + 31 one-token steps
    # Hugging Face's own cached greedy generate on the source model with the adapter merged into its weights
    hf = copy.deepcopy(base)
    merged = peftfx.merge(pm)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(merged.get_parameter(name) if _has(merged, name) else p)
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                          min_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(got, out.numpy())
    # I/O binding (what CUDA uses; here bound on the CPU) gives the same tokens
    np.testing.assert_array_equal(Runtime(report.path, io_binding=True).generate(prompt, NEW), got)


def _has(module, name):
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


def test_eos_stops_a_row(exported):
    arch, base, pm, report = exported
    prompt = M.ids(2, 5, seed=3)
    rt = Runtime(report.path)
    full = rt.generate(prompt, 12)
    eos = int(full[0, 7])                                    # the third new token of row 0 is declared EOS
    out = rt.generate(prompt, 12, eos_token_id=eos)
    first = int(np.argmax(out[0, 5:] == eos)) + 5
    assert (out[0, first:] == eos).all() and (out[0, :first] == full[0, :first]).all()
