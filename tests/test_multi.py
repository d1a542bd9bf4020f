"""Named adapters: each active adapter equals its single-adapter model, mixed batches equal per-row runs,
combine equals HF PEFT's add_weighted_adapter, named checkpoints round-trip, errors come before changes."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import peftfx
from peftfx import LoRA, select
from tests import models as M

TOL = 1e-5
QV = select.role("attn.q") | select.role("attn.v")
B_RULE = LoRA(rank=2, alpha=4, targets=select.role("attn.q") | select.role("mlp.up") | select.role("embed"))


def _randomise(modules, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _randomise_hf(hf, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    hf.eval()


def _named(pm, name):
    return [m.adapters[name] for m in pm.adapter_modules().values() if name in getattr(m, "adapters", {})]


def _setup(arch="llama", refs=True):
    """A model with adapters "default" (q, v) and "b" (q, up, embedding) and their single-adapter twins."""
    base = getattr(M, arch)()
    ids = M.ids(batch=4, seq=7)
    kw = {"input_ids": ids}
    b_rule = B_RULE if arch == "llama" else LoRA(rank=2, alpha=4, targets=select.role("attn.qkv") | select.role("mlp.up"))
    pm = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=QV), kw)
    _randomise(pm.adapter_modules().values(), 1)
    if not refs:
        peftfx.add_adapter(pm, "b", b_rule)
        return base, pm, None, None, kw
    ref_a = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=QV), kw)
    ref_a.load_state_dict(pm.state_dict())
    peftfx.add_adapter(pm, "b", b_rule)
    ref_b = peftfx.apply(copy.deepcopy(base), b_rule, kw)
    _randomise(_named(pm, "b"), 2)
    for rec in ref_b.peft_info.adapters:
        ref_b.get_submodule(rec).load_state_dict(pm.get_submodule(rec).adapters["b"].state_dict())
    return base, pm, ref_a, ref_b, kw


def test_active_adapter_equals_its_single_adapter_model_and_none_is_base():
    base, pm, ref_a, ref_b, kw = _setup()
    assert peftfx.adapter_names(pm) == ["default", "b"] and peftfx.active_adapters(pm) == ["default"]
    keys = pm.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.lora.adapters.b.lora_A" in keys
    assert "model.embed_tokens.lora.adapters.b.lora_embedding_A" in keys
    with torch.no_grad():
        assert torch.equal(pm(**kw).logits, ref_a(**kw).logits)            # bit-identical: same module code
        peftfx.set_active(pm, "b")
        assert (pm(**kw).logits - ref_b(**kw).logits).abs().max().item() < TOL
        peftfx.set_active(pm, None)
        assert torch.equal(pm(**kw).logits, base(**kw).logits)
        peftfx.set_active(pm, ["default", "b"])                            # both: the sum of the deltas
        both = copy.deepcopy(base)
        for ref in (ref_a, ref_b):
            for rec in ref.peft_info.adapters.values():
                both.get_parameter(rec.site["weight"]).add_(
                    peftfx.sites.canonical_weight(ref.get_submodule(rec.name).delta(), rec.site["kind"]))
        assert (pm(**kw).logits - both(**kw).logits).abs().max().item() < TOL
    # only the active adapter receives gradients
    peftfx.set_active(pm, "b")
    pm(**kw).logits.pow(2).mean().backward()
    got = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert got and all(".adapters.b." in n for n in got)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])     # gpt2: Conv1D sites see (batch·seq, in) rows
def test_mixed_batch_matches_per_row_single_adapter_runs(arch):
    base, pm, ref_a, ref_b, kw = _setup(arch)
    rows = ["b", None, "default", "b"]
    with torch.no_grad():
        out = peftfx.forward_mixed(pm, rows, **kw).logits
        refs = {"default": ref_a(**kw).logits, "b": ref_b(**kw).logits, None: base(**kw).logits}
        for i, r in enumerate(rows):
            assert (out[i] - refs[r][i]).abs().max().item() < TOL, (i, r)
        idx = torch.tensor([1, -1, 0, 1])                                   # same, by index
        assert (peftfx.forward_mixed(pm, idx, **kw).logits - out).abs().max().item() < TOL
        assert torch.equal(pm(**kw).logits, refs["default"])                # routing ends with the block
    # gradients of a mixed batch = the sum of per-adapter gradients on their own rows
    loss = peftfx.forward_mixed(pm, rows, **kw).logits.pow(2).sum()
    loss.backward()
    ref_loss = sum(ref(**{k: v[sel] for k, v in kw.items()}).logits.pow(2).sum()
                   for ref, sel in ((ref_b, [0, 3]), (ref_a, [2])))
    ref_loss.backward()
    for rec in ref_b.peft_info.adapters:
        for n, p in ref_b.get_submodule(rec).named_parameters():
            g = pm.get_submodule(rec).adapters["b"].get_parameter(n).grad
            assert (g - p.grad).abs().max().item() < 1e-4 * max(1.0, p.grad.abs().max().item())


def test_mixed_batch_against_hf_peft_adapter_names():
    from peft import LoraConfig, get_peft_model

    base = M.llama()
    kw = {"input_ids": M.ids(batch=3, seq=6)}
    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    hf.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]))
    _randomise_hf(hf, 3)
    pm = peftfx.trace(copy.deepcopy(base), kw)
    peftfx.add_adapter(pm, "a", LoRA(rank=4, alpha=8, targets=QV))
    peftfx.add_adapter(pm, "b", LoRA(rank=2, alpha=4, targets=select.role("attn.q") | select.role("mlp.up")))
    with torch.no_grad():
        for name, mod in hf.named_modules():
            for ours, theirs in (("a", "default"), ("b", "b")):
                if hasattr(mod, "lora_A") and theirs in mod.lora_A:
                    ad = pm.get_submodule(name.replace("base_model.model.", "") + ".lora").adapters[ours]
                    ad.lora_A.copy_(mod.lora_A[theirs].weight)
                    ad.lora_B.copy_(mod.lora_B[theirs].weight)
        ref = hf(**kw, adapter_names=["b", "__base__", "default"]).logits
        out = peftfx.forward_mixed(pm, ["b", None, "a"], **kw).logits
    assert (out - ref).abs().max().item() < TOL


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_combine_matches_hf_add_weighted_adapter(combination):
    from peft import LoraConfig, get_peft_model

    base = M.llama()
    kw = {"input_ids": M.ids(batch=2, seq=6)}
    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    hf.add_adapter("b", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    _randomise_hf(hf, 4)
    pm = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=QV), kw)
    peftfx.add_adapter(pm, "b", LoRA(rank=4, alpha=16, targets=QV))
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if hasattr(mod, "lora_A") and "b" in mod.lora_A:
                multi = pm.get_submodule(name.replace("base_model.model.", "") + ".lora")
                for n in ("default", "b"):
                    multi.adapters[n].lora_A.copy_(mod.lora_A[n].weight)
                    multi.adapters[n].lora_B.copy_(mod.lora_B[n].weight)
    hf.add_weighted_adapter(["default", "b"], [0.7, -0.3], "mix", combination_type=combination)
    hf.set_adapter("mix")
    peftfx.combine(pm, {"default": 0.7, "b": -0.3}, "mix", combination=combination)
    peftfx.set_active(pm, "mix")
    hq = hf.base_model.model.model.layers[0].self_attn.q_proj
    ours = pm.get_submodule("model.layers.0.self_attn.q_proj.lora")
    assert torch.allclose(ours.adapters["mix"].lora_A, hq.lora_A["mix"].weight, atol=1e-7)
    assert torch.allclose(ours.adapters["mix"].lora_B, hq.lora_B["mix"].weight, atol=1e-7)
    with torch.no_grad():
        assert (pm(**kw).logits - hf(**kw).logits).abs().max().item() < TOL
        exact = 0.7 * ours.adapters["default"].delta() - 0.3 * ours.adapters["b"].delta()
        err = (ours.adapters["mix"].delta() - exact).abs().max().item()
    assert (err < 1e-6) == (combination == "cat")       # cat is the sum of deltas; linear is not


def test_named_checkpoints_round_trip_and_keep_the_single_adapter_format(tmp_path):
    base, pm, ref_a, ref_b, kw = _setup()
    path = peftfx.save_adapter(pm, tmp_path / "b", adapter="b")
    cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    assert cfg["adapter_name"] == "b" and cfg["format"] == "peftfx-adapter/1"
    with torch.no_grad():
        single = peftfx.load_adapter(copy.deepcopy(base), path, kw)      # an ordinary single-adapter model
        assert (single(**kw).logits - ref_b(**kw).logits).abs().max().item() < TOL
        assert "model.layers.0.self_attn.q_proj.lora.lora_A" in single.state_dict()
        other = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=QV), kw)
        peftfx.load_adapter(other, path)                                 # into a named slot "b"
        assert peftfx.adapter_names(other) == ["default", "b"]
        peftfx.set_active(other, "b")
        assert (other(**kw).logits - ref_b(**kw).logits).abs().max().item() < TOL
        peftfx.load_adapter(other, peftfx.save_adapter(pm, tmp_path / "d", adapter="default"), adapter="a2")
        peftfx.set_active(other, "a2")
        assert torch.equal(other(**kw).logits, ref_a(**kw).logits)
    with pytest.raises(peftfx.CheckpointError, match="adapter="):
        peftfx.save_adapter(pm, tmp_path / "x")
    from peft import PeftModel

    peftfx.save_adapter(pm, tmp_path / "hf", format="hf", adapter="default")   # the HF PEFT format too
    hf = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert (hf(**kw).logits - ref_a(**kw).logits).abs().max().item() < TOL


def test_delete_and_merge():
    base, pm, ref_a, ref_b, kw = _setup()
    n_nodes = len(pm.graph.nodes)
    with torch.no_grad():
        peftfx.set_active(pm, "b")
        merged = peftfx.merge(pm)
        assert (merged(**kw).logits - ref_b(**kw).logits).abs().max().item() < TOL
        with pytest.raises(peftfx.PeftfxError, match="unmerge"):
            peftfx.set_active(merged, "default")
        restored = peftfx.unmerge(merged)
        assert (restored(**kw).logits - ref_b(**kw).logits).abs().max().item() < TOL
        peftfx.delete_adapter(pm, "b")                      # b alone sat on up_proj and the embedding
        assert len(pm.graph.nodes) == n_nodes - 2 - 1       # 2 up_proj + 1 embedding nodes gone
        assert peftfx.active_adapters(pm) == []
        peftfx.set_active(pm, "default")
        assert torch.equal(pm(**kw).logits, ref_a(**kw).logits)
        peftfx.delete_adapter(pm, "default")
        assert not any(n.op == "call_module" for n in pm.graph.nodes)
        assert torch.equal(pm(**kw).logits, base(**kw).logits)


def test_errors_are_clear_and_change_nothing():
    base, pm, _, _, kw = _setup(refs=False)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(peftfx.PeftfxError, match="already has an adapter named 'b'"):
        peftfx.add_adapter(pm, "b", LoRA())
    with pytest.raises(peftfx.PeftfxError, match="identifiers"):
        peftfx.add_adapter(pm, "a.b", LoRA())
    with pytest.raises(peftfx.RuleError, match="LoRA adapters"):
        peftfx.add_adapter(pm, "c", peftfx.IA3())
    with pytest.raises(peftfx.NoMatchError):
        peftfx.add_adapter(pm, "c", LoRA(targets=select.name("nothing_here")))
    with pytest.raises(peftfx.PeftfxError, match="unknown adapter"):
        peftfx.set_active(pm, "zzz")
    with pytest.raises(peftfx.PeftfxError, match="4 rows"):
        peftfx.forward_mixed(pm, ["b", None], **kw)
    with pytest.raises(peftfx.PeftfxError, match="finite"):
        peftfx.combine(pm, {"b": float("nan")}, "c")
    assert peftfx.adapter_names(pm) == ["default", "b"]
    after = pm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
