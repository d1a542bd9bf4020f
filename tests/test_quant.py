"""Quantized base: the NF4 code and packing against independent references, round-trip error bounds, the
quantized graph equal to a float model holding the dequantized weights (outputs and LoRA gradients),
training, merge (exact in float, bounded when re-quantized), meta-device loading, errors."""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx import LoRA, quant, select
from tests import models as M

ALL = select.role("attn.*") | select.role("mlp.*")


def test_nf4_code_is_the_normal_quantile_construction():
    """QLoRA §3 / appendix: 8 positive quantiles of N(0,1) over [0.5, δ], 7 negative, plus 0, scaled to ±1
    (δ = 0.9677083, bitsandbytes' offset)."""
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    v = v / v.abs().max()
    assert torch.allclose(v, torch.tensor(quant.NF4_CODE, dtype=torch.float64), atol=2e-7)


def _reference_nf4(w, blocksize=64, sblock=256):
    """An independent, unoptimised NF4 with double quantization: brute-force argmin over the 16 codes."""
    code = torch.tensor(quant.NF4_CODE, dtype=torch.float64)
    flat = w.double().reshape(-1)
    blocks = flat.view(-1, blocksize)
    c = blocks.abs().amax(1)
    mu = c.mean()
    chat = []
    for i in range(0, c.numel(), sblock):
        part = c[i:i + sblock] - mu
        s2 = part.abs().max() / 127
        kk = torch.round(part / s2).clamp(-127, 127)
        chat.append((kk * s2 + mu).clamp(min=0))
    chat = torch.cat(chat)
    idx = ((blocks / chat[:, None]).clamp(-1, 1)[..., None] - code).abs().argmin(-1)
    return idx.reshape(-1), (code[idx] * chat[:, None]).reshape(w.shape), c, chat


def test_nf4_matches_reference_implementation_and_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.02           # 384 blocks → 2 scale blocks (one partial)
    m = quant.NF4Weight.from_float(w)
    idx_ref, w_ref, c, chat = _reference_nf4(w)
    agree = (m.indices()[: w.numel()].long() == idx_ref).float().mean().item()
    assert agree > 0.9999                                   # ties at float rounding aside
    assert (m() - w_ref.float()).abs().max().item() < 1e-6
    assert m.packed.dtype == torch.uint8 and m.packed.numel() == w.numel() // 2
    assert int(m.packed[0]) >> 4 == int(idx_ref[0]) and int(m.packed[0]) & 15 == int(idx_ref[1])  # high nibble first
    # |w − ŵ| ≤ ĉ·δ/2 + |c − ĉ| per block, δ the widest code gap
    code = torch.tensor(quant.NF4_CODE)
    half_gap = (code[1:] - code[:-1]).max() / 2
    err = (m() - w).abs().view(-1, 64)
    bound = (chat.float() * half_gap + (c - chat).abs().float())[:, None] + 1e-7
    assert bool((err <= bound).all())
    e4, e8 = quant.roundtrip_error(w, 4), quant.roundtrip_error(w, 8)
    # documented in README (Gaussian weights): NF4 ≈ 9% relative Frobenius error, int8 ≈ 0.75%
    assert 0.07 < e4["rel_fro"] < 0.11 and 0.005 < e8["rel_fro"] < 0.01
    assert e4["max_rel"] < 0.2 and e8["max_rel"] < 0.01


def test_int8_is_per_row_absmax_and_bits_per_weight():
    w = torch.randn(64, 128) * 0.05
    m = quant.Int8Weight.from_float(w)
    s = w.abs().amax(1) / 127
    assert torch.equal(m.scale, s)
    assert torch.equal(m(), torch.round(w / s[:, None]).clamp(-127, 127) * s[:, None])
    assert (m() - w).abs().max() <= (s.max() / 2) + 1e-8
    nf4 = quant.NF4Weight.from_float(torch.randn(4096, 1024))
    bits = 8 * sum(b.numel() * b.element_size() for n, b in nf4.named_buffers() if n != "code") / (4096 * 1024)
    assert abs(bits - 4.127) < 0.01                          # the paper's 4.127 bits per parameter


@pytest.mark.parametrize("bits,arch", [(4, "llama"), (8, "gpt2")])
def test_quantized_graph_equals_float_model_with_dequantized_weights(bits, arch):
    base = getattr(M, arch)()
    kw = {"input_ids": M.ids(batch=2, seq=8)}
    rule = LoRA(rank=4, alpha=8, targets=ALL)
    pm = peftfx.apply(copy.deepcopy(base), rule, kw)
    for m in pm.adapter_modules().values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    peftfx.quantize(pm, bits=bits)
    q = quant.quantized_weights(pm)
    assert len(q) == (14 if arch == "llama" else 8)          # every linear except the head (and embeddings)
    assert not any(n in dict(pm.named_parameters()) for n in q)
    from peftfx.passes.quantize import dequant_nodes

    for node in dequant_nodes(pm):          # each dequantizer runs right before its first reader
        assert node.next in node.users
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, deq in q.items():
            ref.get_parameter(name).copy_(deq())
    ref = peftfx.apply(ref, rule, kw)
    ref.load_state_dict({k: v for k, v in pm.state_dict().items() if ".lora." in k}, strict=False)
    pm.train()
    ref.train()
    torch.manual_seed(1)                  # GPT-2 has dropout: the same seed draws the same masks
    a = pm(**kw).logits
    torch.manual_seed(1)
    b = ref(**kw).logits
    assert (a - b).abs().max().item() < 1e-5
    a.pow(2).mean().backward()
    b.pow(2).mean().backward()
    ga = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert ga.keys() == gb.keys() and len(ga) == 2 * len(pm.peft_info.adapters)
    assert max((ga[k] - gb[k]).abs().max().item() for k in ga) < 1e-6


def test_backward_rebuilds_dequantized_weights_instead_of_saving_them(monkeypatch):
    pm = peftfx.apply(M.llama(), LoRA(rank=4, targets=ALL), {"input_ids": M.ids()})
    peftfx.quantize(pm, bits=4)
    rebuilt = []
    orig = quant.recompute._Recompute.unpack
    monkeypatch.setattr(quant.recompute._Recompute, "unpack",
                        staticmethod(lambda p: rebuilt.append(p) or orig(p) if isinstance(p, tuple) else orig(p)))
    pm.train()
    pm(input_ids=M.ids()).logits.sum().backward()
    # every linear whose input needs a gradient saves W for grad_input: 14 − 3 (layer 0's q, k, v read the
    # frozen embedding output)
    assert len(rebuilt) == 11


def test_training_on_quantized_base_lowers_loss_and_keeps_buffers():
    pm = peftfx.apply(M.llama(), LoRA(rank=8, alpha=16, targets=ALL), {"input_ids": M.ids()})
    peftfx.quantize(pm, bits=4)
    packed = {k: v.clone() for k, v in pm.state_dict().items() if ".lora." not in k}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = M.ids(batch=4, seq=12, seed=3)
    pm.train()
    losses = []
    for _ in range(8):
        logits = pm(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in packed.items())


def test_merge_through_the_dequantizer():
    kw = {"input_ids": M.ids()}
    pm = peftfx.apply(M.llama(), LoRA(rank=4, alpha=8, targets=select.role("attn.*")), kw)
    for m in pm.adapter_modules().values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    with torch.no_grad():
        float_out = pm(**kw).logits
    peftfx.quantize(pm, bits=4)
    with torch.no_grad():
        out = pm(**kw).logits
        rel_q = ((out - float_out).norm() / float_out.norm()).item()   # the base's own NF4 error
        exact = peftfx.merge(pm, requantize=False)               # float weights where adapters merged
        assert (exact(**kw).logits - out).abs().max().item() < 1e-5
        assert len(quant.quantized_weights(exact)) == 6         # the mlp weights stay NF4
        assert (peftfx.unmerge(exact)(**kw).logits - out).abs().max().item() < 1e-5
        again = peftfx.merge(pm)                                # default: re-quantized, stays small
        assert len(quant.quantized_weights(again)) == 14
        for name, deq in quant.quantized_weights(again).items():
            if "self_attn" in name:                             # = quantize(dequantize(W) + ΔW)
                w = exact.get_parameter(name)
                assert torch.equal(deq(), quant.NF4Weight.from_float(w)())
        rel = ((again(**kw).logits - out).norm() / out.norm()).item()
        assert 0 < rel < 1.5 * rel_q, (rel, rel_q)              # one more rounding of the same size
        assert len(quant.quantized_weights(pm)) == 14           # the caller's model is unchanged
        assert (pm(**kw).logits - out).abs().max().item() == 0
    with pytest.raises(peftfx.PeftfxError, match="re-quantized"):
        peftfx.unmerge(again)


def test_quantize_on_load_from_meta_and_add_adapter_after(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    real = M.llama()
    kw = {"input_ids": M.ids()}
    save_file({**dict(real.named_parameters()), **dict(real.named_buffers())}, str(tmp_path / "m.safetensors"))
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**real.config.to_dict()))
    pm = peftfx.trace(meta, {"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta")})
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        peftfx.quantize(pm, bits=4, source=f)
    assert not any(t.device.type == "meta" for t in list(pm.parameters()) + list(pm.buffers()))
    ref = peftfx.trace(copy.deepcopy(real), kw)
    peftfx.quantize(ref, bits=4)
    with torch.no_grad():
        assert (pm(**kw).logits - ref(**kw).logits).abs().max().item() < 1e-6
    peftfx.add_adapter(pm, "default", LoRA(rank=4, targets=ALL))   # LoRA on the quantized base
    assert len(pm.peft_info.adapters) == 14
    assert peftfx.trainable_parameters(pm)[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad) > 0


def test_errors():
    pm = peftfx.apply(M.llama(), LoRA(rank=2), {"input_ids": M.ids()})
    with pytest.raises(peftfx.PeftfxError, match="bits must be 4"):
        peftfx.quantize(pm, bits=3)
    with pytest.raises(peftfx.NoMatchError):
        peftfx.quantize(pm, targets=select.name("nothing"))
    peftfx.quantize(pm, bits=8, targets=select.role("attn.q"))
    with pytest.raises(peftfx.NoMatchError, match="already quantized"):
        peftfx.quantize(pm, bits=8, targets=select.role("attn.q"))
    with torch.device("meta"):
        meta = M.llama()
    mp = peftfx.trace(meta, {"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta")})
    with pytest.raises(peftfx.CheckpointError, match="source="):
        peftfx.quantize(mp)
    with pytest.raises(peftfx.CheckpointError, match="lacks"):
        peftfx.quantize(mp, source={})
