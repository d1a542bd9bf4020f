"""Prefix tuning: parity with Hugging Face PEFT on GPT-2 and Llama (GQA; with and without the reparameterisation
MLP; traced with and without an attention mask), hand-computed references where HF PEFT does not apply (BERT —
HF PEFT prefix tuning fails there under transformers 5; positions not offset; layer selection; SDPA with
is_causal=True; eager attention), checkpoints, training, bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftfx
from peftfx import PrefixTuning, PromptTuning, select
from tests import models as M

TOL = 1e-5  # float32
N = 4


def _inputs(batch=3, seq=10):
    ids = M.ids(batch, seq)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _copy_from_hf(hf, ours) -> None:
    """Perturb HF's PrefixEncoder (embedding.weight, transform.*), then copy it into ours (prefix_embedding,
    prefix_mlp.*)."""
    g = torch.Generator().manual_seed(9)
    enc = hf.prompt_encoder.default
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours.prefix.load_state_dict({k.replace("embedding.weight", "prefix_embedding").replace("transform", "prefix_mlp"): v
                                 for k, v in enc.state_dict().items()})


@pytest.mark.parametrize("arch,projection,with_mask", [("gpt2", False, True), ("llama", True, True),
                                                       ("llama", False, False)])
def test_parity_with_hf_peft(arch, projection, with_mask):
    from peft import PrefixTuningConfig, get_peft_model

    base = getattr(M, arch)()
    inputs = _inputs() if with_mask else {"input_ids": M.ids(3, 10)}
    ours = peftfx.apply(copy.deepcopy(base), PrefixTuning(num_virtual_tokens=N, projection=projection,
                                                          encoder_hidden_size=24), inputs)
    hf = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                                prefix_projection=projection, encoder_hidden_size=24))
    _copy_from_hf(hf, ours)
    assert peftfx.trainable_parameters(ours)[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    if not projection:     # the table: L · 2 · kv heads · head dim per virtual token (Llama: 2 kv heads of 16)
        assert tuple(ours.prefix.prefix_embedding.shape) == (N, 2 * 2 * (64 if arch == "gpt2" else 32))
    other = {"input_ids": M.ids(2, 7, seed=4)}
    if with_mask:
        other["attention_mask"] = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        for x in (inputs, other):
            a, b = hf(**x).logits, ours(**x).logits
            assert a.shape == b.shape
            assert (a - b).abs().max().item() < TOL
        assert (b - base(**other).logits).abs().max().item() > 1e-3


def _cache_reference(base, table, inputs, positions):
    """The base model run with the prefix as its KV cache and explicit position ids."""
    from transformers import DynamicCache

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, s = ids.shape
    heads, hd = base.config.n_head, base.config.n_embd // base.config.n_head
    kv = table.view(N, -1, heads, hd)
    cache = DynamicCache()
    for layer in range(kv.shape[1] // 2):
        k, v = (kv[:, 2 * layer + i].transpose(0, 1)[None].expand(b, -1, -1, -1) for i in (0, 1))
        cache.update(k, v, layer)
    return base(input_ids=ids, attention_mask=torch.cat([torch.ones(b, N, dtype=mask.dtype), mask], 1),
                past_key_values=cache, position_ids=positions.expand(b, s)).logits


@pytest.mark.parametrize("offset", [False, True])
def test_position_offset_against_cache_reference(offset):
    """GPT-2 (absolute positions): offset=True gives real tokens positions N…N+S-1 (HF PEFT, the paper);
    offset=False keeps 0…S-1. Reference: the base model with the prefix as KV cache and explicit positions.
    With offset=True a LoRA on the position table (role embed.position) rides along: it must read the shifted
    ids too (reference: its update merged into the table by hand)."""
    base = M.gpt2()
    inputs = _inputs()
    rules = [PrefixTuning(num_virtual_tokens=N, position_offset=offset)]
    if offset:
        rules.append(peftfx.LoRA(rank=2, targets=select.role("embed.position")))
    ours = peftfx.apply(copy.deepcopy(base), rules, inputs)
    ref_model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ours.prefix.prefix_embedding.normal_(generator=g)
        if offset:
            lora = ours.get_submodule("transformer.wpe.lora")
            lora.lora_embedding_A.normal_(generator=g)
            ref_model.transformer.wpe.weight.add_(lora.delta().T)
        s = inputs["input_ids"].shape[1]
        ref = _cache_reference(ref_model, ours.prefix(), inputs, torch.arange(s) + (N if offset else 0))
        assert (ours(**inputs).logits - ref).abs().max().item() < TOL


class _PrefixSDPA:
    """Hand reference: wraps F.scaled_dot_product_attention so that call i (layer i) sees the prefix of
    ``prefixes[i]`` in front of its keys and values, with the mask extended by attending columns."""

    def __init__(self, prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.prefixes, self.calls, self.orig = prefixes, 0, F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        layer, self.calls = self.calls, self.calls + 1
        if layer in self.prefixes:
            pk, pv = self.prefixes[layer]                       # [kv heads, N, d]
            rep = k.shape[1] // pk.shape[0]
            k = torch.cat([pk.repeat_interleave(rep, 0)[None].expand(k.shape[0], -1, -1, -1), k], 2)
            v = torch.cat([pv.repeat_interleave(rep, 0)[None].expand(v.shape[0], -1, -1, -1), v], 2)
            if is_causal:
                attn_mask, is_causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(N), False
            elif attn_mask is not None and attn_mask.shape[-1] > 1:
                pad = torch.ones if attn_mask.dtype == torch.bool else torch.zeros
                attn_mask = torch.cat([pad(*attn_mask.shape[:-1], N, dtype=attn_mask.dtype)
                                       .expand(*attn_mask.shape[:-1], N), attn_mask], -1)
        return self.orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)


def _layer_prefixes(table, layers, heads, hd):
    kv = table.view(N, -1, heads, hd)
    return {layer: (kv[:, 2 * i].transpose(0, 1), kv[:, 2 * i + 1].transpose(0, 1)) for i, layer in enumerate(layers)}


def test_bert_against_hand_reference(monkeypatch):
    """BERT (HF PEFT prefix tuning fails here): the reference is HF's own BERT in eager PyTorch with the prefix
    concatenated inside scaled_dot_product_attention and the real tokens at positions N…N+S-1."""
    base = M.bert()
    inputs = _inputs()
    ours = peftfx.apply(copy.deepcopy(base), PrefixTuning(num_virtual_tokens=N, projection=True), inputs)
    with torch.no_grad():
        got = ours(**inputs).logits
        patch = _PrefixSDPA(_layer_prefixes(ours.prefix(), [0, 1], 4, 16))
        monkeypatch.setattr(F, "scaled_dot_product_attention", patch)
        ref = base(**inputs, position_ids=torch.arange(N, N + 10).expand(3, 10)).logits
    assert patch.calls == 2
    assert (got - ref).abs().max().item() < TOL


def test_layer_selection_llama(monkeypatch):
    """targets=select.layer(1): one prefix, at layer 1 only (table N × 1·2·Dkv); positions still offset."""
    base = M.llama()
    inputs = _inputs()
    ours = peftfx.apply(copy.deepcopy(base), PrefixTuning(num_virtual_tokens=N, targets=select.layer(1)), inputs)
    assert tuple(ours.prefix.prefix_embedding.shape) == (N, 2 * 32)
    with torch.no_grad():
        ours.prefix.prefix_embedding.normal_(generator=torch.Generator().manual_seed(4))
        got = ours(**inputs).logits
        monkeypatch.setattr(F, "scaled_dot_product_attention", _PrefixSDPA(_layer_prefixes(ours.prefix(), [1], 2, 16)))
        ref = base(**inputs, position_ids=torch.arange(N, N + 10).expand(3, 10)).logits
    assert (got - ref).abs().max().item() < TOL


class _CausalLM(nn.Module):
    """One attention layer calling SDPA with is_causal=True (no mask tensor), no positions."""

    def __init__(self, vocab=50, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.emb, self.qkv, self.o, self.head = nn.Embedding(vocab, d), nn.Linear(d, 3 * d), nn.Linear(d, d), \
            nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.o(y.transpose(1, 2).reshape(b, s, d)))


def test_is_causal_sdpa_becomes_explicit_mask(monkeypatch):
    """SDPA's is_causal with a longer key would align the mask top-left and hide the prefix from early queries;
    the rewrite passes key j ≤ query i + N explicitly. Reference: the model itself with the prefix patched in."""
    base = _CausalLM().eval()
    ids = M.ids(2, 9, vocab=50)
    ours = peftfx.apply(copy.deepcopy(base), PrefixTuning(num_virtual_tokens=N), {"ids": ids})
    with torch.no_grad():
        ours.prefix.prefix_embedding.normal_(generator=torch.Generator().manual_seed(6))
        got = ours(ids)
        monkeypatch.setattr(F, "scaled_dot_product_attention", _PrefixSDPA(_layer_prefixes(ours.prefix(), [0], 4, 8)))
        ref = base(ids)
    assert (got - ref).abs().max().item() < TOL
    sdpa = next(n for n in ours.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    assert not sdpa.kwargs.get("is_causal", False) and (len(sdpa.args) <= 5 or not sdpa.args[5])


def test_eager_attention_hand_reference():
    """The hand-written TinyTransformer (eager matmul → softmax → matmul, fused QKV through a plain matmul)."""
    base = M.TinyTransformer().eval()
    ids = M.ids(2, 8, vocab=100)
    ours = peftfx.apply(copy.deepcopy(base), PrefixTuning(num_virtual_tokens=N), {"ids": ids})
    with torch.no_grad():
        ours.prefix.prefix_embedding.normal_(generator=torch.Generator().manual_seed(8))
        pre = _layer_prefixes(ours.prefix(), [0, 1], 4, 8)
        x = base.tok(ids)
        b, s, d = x.shape
        for i, blk in enumerate(base.blocks):
            q, k, v = (t.reshape(b, s, 4, 8).transpose(1, 2) for t in (blk.norm1(x) @ blk.qkv).chunk(3, dim=-1))
            k = torch.cat([pre[i][0][None].expand(b, -1, -1, -1), k], 2)
            v = torch.cat([pre[i][1][None].expand(b, -1, -1, -1), v], 2)
            y = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v).transpose(1, 2).reshape(b, s, d)
            x = x + blk.proj(y)
            y = blk.norm2(x)
            x = x + blk.w_down(F.silu(blk.w_gate(y)) * blk.w_up(y))
        assert (ours(ids) - base.out(x)).abs().max().item() < TOL


def test_checkpoint_round_trip(tmp_path):
    base = M.gpt2()
    inputs = _inputs()
    ours = peftfx.apply(copy.deepcopy(base), PrefixTuning(num_virtual_tokens=N, projection=True), inputs)
    with torch.no_grad():
        for p in ours.prefix.parameters():
            p.add_(0.01)
        ref = ours(**inputs).logits
    peftfx.save_adapter(ours, tmp_path / "px")
    back = peftfx.load_adapter(copy.deepcopy(base), tmp_path / "px", inputs)
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, ref)


def test_training_lowers_loss():
    ids = M.ids(4, 12)
    labels = torch.full_like(ids, 7)
    ours = peftfx.apply(M.llama(), PrefixTuning(num_virtual_tokens=N, projection=True), {"input_ids": ids,
                                                                                          "labels": labels})
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {"prefix.prefix_embedding", "prefix.prefix_mlp.0.weight", "prefix.prefix_mlp.0.bias",
         "prefix.prefix_mlp.2.weight", "prefix.prefix_mlp.2.bias"}
    before, after = M.train_with_labels(ours, ids, labels, steps=15)
    assert after < before - 0.3, (before, after)


class _NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.ff, self.head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50)

    def forward(self, ids):
        return self.head(torch.relu(self.ff(self.emb(ids))))


def test_bad_input_is_clear_and_changes_nothing():
    from peftfx.apply import apply_to_graph

    model = _NoAttention()
    with pytest.raises(peftfx.SiteError, match="attention ops"):
        peftfx.apply(model, PrefixTuning(num_virtual_tokens=2), {"ids": M.ids(2, 6, vocab=50)})
    assert all(p.requires_grad for p in model.parameters())
    pm = peftfx.trace(M.gpt2(), {"input_ids": M.ids()})
    code = pm.code
    for rules, err, match in [
            ([PrefixTuning(num_virtual_tokens=2), PromptTuning(num_virtual_tokens=2)], peftfx.ConflictError,
             "virtual-token methods"),
            ([PrefixTuning(num_virtual_tokens=2, targets=select.layer(7))], peftfx.SiteError, "layers")]:
        with pytest.raises(err, match=match):
            apply_to_graph(pm, rules)
        assert pm.code == code and not pm.peft_info.adapters                # raised before any change
    with pytest.raises(peftfx.RuleError, match="num_virtual_tokens"):
        PrefixTuning(num_virtual_tokens=-1)


def test_inspect_describes_graph_level_rules():
    ids = M.ids()
    ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    text = str(peftfx.inspect(M.llama(), [peftfx.LoRA(rank=2), PrefixTuning(num_virtual_tokens=3)], ex))
    assert "rule 1: prefix → graph-level: 3 key/value prefix row(s) at 2 attention op(s) (layers 0–1; " \
           "2 kv head(s) × 16)" in text
    text = str(peftfx.inspect(M.gpt2(), peftfx.PromptTuning(num_virtual_tokens=4), ex))
    assert "4 virtual token(s) after transformer.wte (role embed)" in text
    assert "input_ids (ids), attention_mask (mask)" in text
