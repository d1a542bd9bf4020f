"""LoRA: parity with Hugging Face PEFT (same base, A/B copied across), untrained identity, options."""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx import LoRA, select
from tests import models as M

TOL = 1e-5  # float32


def _hf_lora(model, targets, rank=4, alpha=8, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                            init_lora_weights=True, **kw))


def _randomise_and_copy(hf, ours):
    """Give HF's LoRA B random values (A is already random), then copy A/B into ours by module path."""
    g = torch.Generator().manual_seed(7)
    copied = 0
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=g) * 0.1)
                ad = ours.get_submodule(name.replace("base_model.model.", "", 1) + ".lora")
                ad.lora_A.copy_(mod.lora_A["default"].weight)
                ad.lora_B.copy_(mod.lora_B["default"].weight)
                copied += 1
    return copied


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("arch,targets,roles", [
    ("gpt2", ["c_attn"], select.role("attn.q")),                     # fused QKV, one pair, Conv1D (addmm, W^T)
    ("llama", ["q_proj", "v_proj"], select.role("attn.q") | select.role("attn.v")),
    ("falcon", ["query_key_value", "dense_4h_to_h"], select.role("attn.qkv") | select.role("mlp.down")),  # x @ W.T
])
def test_parity_with_hf_peft(arch, targets, roles):
    base = getattr(M, arch)()
    ids = M.ids(batch=3, seq=10)
    ours = peftfx.apply(copy.deepcopy(base), [LoRA(rank=4, alpha=8, targets=roles)], {"input_ids": ids})
    hf = _hf_lora(copy.deepcopy(base), targets, fan_in_fan_out=(arch == "gpt2"))
    n = _randomise_and_copy(hf, ours)
    assert n == len(ours.peft_info.adapters) > 0
    hf_train = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert peftfx.trainable_parameters(ours)[0] == hf_train
    with torch.no_grad():
        a, b = _logits(hf(input_ids=ids)), _logits(ours(input_ids=ids))
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL
    assert (a - _logits(base(input_ids=ids))).abs().max().item() > 1e-3   # the adapters really act


def test_parity_with_hf_peft_minilm_real_weights():
    base, tok = M.minilm()
    enc = tok(["a small test sentence", "graphs are programs too"], padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=8, alpha=16), inputs)   # default: attn.q | attn.v
    keys = sorted(ours.peft_info.adapters)
    assert len(keys) == 12 and all(k.endswith(("query.lora", "value.lora")) for k in keys)
    hf = _hf_lora(copy.deepcopy(base), ["query", "value"], rank=8, alpha=16)
    assert _randomise_and_copy(hf, ours) == 12
    assert peftfx.trainable_parameters(ours)[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    with torch.no_grad():
        a, b = hf(**inputs).logits, ours(**inputs).logits
    assert (a - b).abs().max().item() < TOL


def test_untrained_lora_is_identity_everywhere():
    base = M.llama()
    ids = M.ids()
    peft = peftfx.apply(base, LoRA(rank=4, targets=select.all()), {"input_ids": ids})
    kinds = {rec.site["kind"] for rec in peft.peft_info.adapters.values()}
    assert kinds == {"linear", "embedding"}
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids).logits, base(input_ids=ids).logits)


def test_embedding_lora_parity_with_hf():
    base = M.llama()
    ids = M.ids()
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=select.role("embed")), {"input_ids": ids})
    hf = _hf_lora(copy.deepcopy(base), ["embed_tokens"])
    hmod = hf.base_model.model.model.embed_tokens
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hmod.lora_embedding_A["default"].copy_(torch.randn(hmod.lora_embedding_A["default"].shape, generator=g))
        ad = ours.get_submodule("model.embed_tokens.lora")
        ad.lora_embedding_A.copy_(hmod.lora_embedding_A["default"])
        ad.lora_embedding_B.copy_(hmod.lora_embedding_B["default"])
        a, b = hf(input_ids=ids).logits, ours(input_ids=ids).logits
    assert (a - b).abs().max().item() < TOL


def test_fused_split_pairs_touch_only_selected_slices():
    base = M.gpt2()
    ids = M.ids()
    peft = peftfx.apply(base, LoRA(rank=2, alpha=2, fused="split", targets=select.role("attn.q") | select.role("attn.v")),
                        {"input_ids": ids})
    mod = peft.get_submodule("transformer.h.0.attn.c_attn.lora")
    assert mod.spans == [(0, 64), (128, 192)]
    assert tuple(mod.lora_A.shape) == (4, 64) and tuple(mod.lora_B.shape) == (128, 2)
    torch.nn.init.normal_(mod.lora_B)
    d = mod.delta()                                  # [out=192, in=64]
    assert d[64:128].abs().max() == 0                # the k slice is untouched
    assert d[:64].abs().max() > 0 and d[128:].abs().max() > 0
    # reference: base c_attn output + hand-computed per-slice update
    x = torch.randn(5, 64)
    W = base.transformer.h[0].attn.c_attn.weight     # [in, out] (Conv1D)
    y = x @ W + base.transformer.h[0].attn.c_attn.bias
    ref = y.clone()
    A, B = mod.lora_A, mod.lora_B
    ref[:, :64] += (x @ A[:2].T) @ B[:64].T
    ref[:, 128:] += (x @ A[2:].T) @ B[64:].T
    assert torch.allclose(mod(x, y), ref, atol=1e-6)


def test_rslora_and_gaussian_init():
    cfg = LoRA(rank=16, alpha=8, rslora=True, init="gaussian")
    assert cfg.scaling == pytest.approx(8 / 4)
    peft = peftfx.apply(M.llama(), cfg, {"input_ids": M.ids()})
    A = next(iter(peft.adapter_modules().values())).lora_A
    assert abs(A.std().item() - 1 / 16) < 0.02


def test_lora_on_hand_written_transformer_fused_matmul():
    base = M.TinyTransformer().eval()
    ids = M.ids(vocab=100)
    peft = peftfx.apply(base, LoRA(rank=2, targets=select.role("attn.v") | select.role("mlp.*")), {"ids": ids})
    names = sorted(peft.peft_info.adapters)
    assert "blocks.0.qkv_lora" in names and "blocks.1.w_down.lora" in names
    for mod in peft.adapter_modules().values():
        torch.nn.init.normal_(mod.lora_B, std=0.1)
    # reference: plain PyTorch with the merged weights
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for i, blk in enumerate(ref.blocks):
            qkv = peft.get_submodule(f"blocks.{i}.qkv_lora")
            blk.qkv += qkv.delta().T                    # stored [in, out]
            for n in ("w_gate", "w_up", "w_down"):
                getattr(blk, n).weight += peft.get_submodule(f"blocks.{i}.{n}.lora").delta()
        assert (peft(ids) - ref(ids)).abs().max().item() < 1e-5


def test_bad_options_are_clear():
    with pytest.raises(peftfx.RuleError, match="rank"):
        LoRA(rank=0)
    with pytest.raises(peftfx.RuleError, match="dropout"):
        LoRA(dropout=1.5)
    with pytest.raises(peftfx.RuleError, match="unknown role"):
        select.role("attn.query")
