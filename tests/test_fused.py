"""Fused projections whose q/k/v (or gate/up) rows are found through RoPE (Phi3), a no-op slice on the multi-query
k/v path (GPTBigCode) and per-head interleaving (GPT-NeoX, BLOOM: rows are index sets, not ranges).

References: the expected rows come from each architecture's documented layout (computed here from the config, not
from peftfx); a split LoRA's output is checked against the Hugging Face model with ``W[rows_i] += s·B_i A_i`` written
into the fused weight by hand, IA3 against ``W[rows] *= l`` (and the bias), joint LoRA against HF PEFT. Tolerance
1e-5 (float32) for outputs."""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx import IA3, LoRA, select
from peftfx.roles import assign_roles
from peftfx.sites import find_sites

transformers = pytest.importorskip("transformers")

TOL = 1e-5
H, HEADS, D, R = 64, 4, 16, 4


def _rows(ranges):
    return torch.cat([torch.arange(s, e) for s, e in ranges])


def _interleaved(which: int) -> torch.Tensor:
    """GPT-NeoX / BLOOM: view(b, s, heads, 3·d) → head h holds q, k, v rows at h·3d + (0, d, 2d)."""
    return _rows([(h * 3 * D + which * D, h * 3 * D + (which + 1) * D) for h in range(HEADS)])


# architecture → (model factory, fused qkv path in layer i, expected rows of q, k, v)
def _phi3():
    cfg = transformers.Phi3Config(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                                  num_key_value_heads=2, intermediate_size=128, pad_token_id=0)
    return transformers.Phi3ForCausalLM(cfg)


def _bigcode():
    cfg = transformers.GPTBigCodeConfig(vocab_size=128, n_embd=H, n_layer=2, n_head=HEADS, multi_query=True)
    return transformers.GPTBigCodeForCausalLM(cfg)


def _neox():
    cfg = transformers.GPTNeoXConfig(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                                     intermediate_size=128)
    return transformers.GPTNeoXForCausalLM(cfg)


def _bloom():
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=128, hidden_size=H, n_layer=2,
                                                                  n_head=HEADS))


KV = 2 * D   # Phi3 above: 2 key/value heads
ARCHS = {
    "phi3": (_phi3, "model.layers.{}.self_attn.qkv_proj",
             [_rows([(0, H)]), _rows([(H, H + KV)]), _rows([(H + KV, H + 2 * KV)])]),
    "gpt_bigcode": (_bigcode, "transformer.h.{}.attn.c_attn",          # multi-query: one k/v head
                    [_rows([(0, H)]), _rows([(H, H + D)]), _rows([(H + D, H + 2 * D)])]),
    "gpt_neox": (_neox, "gpt_neox.layers.{}.attention.query_key_value", [_interleaved(i) for i in range(3)]),
    "bloom": (_bloom, "transformer.h.{}.self_attention.query_key_value", [_interleaved(i) for i in range(3)]),
}


def _ids():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def _model(arch):
    torch.manual_seed(0)
    return ARCHS[arch][0]().eval()


def _site_rows(span) -> torch.Tensor:
    return _rows([span]) if isinstance(span[0], int) else _rows(span)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_qkv_rows_found(arch):
    _, path, rows = ARCHS[arch]
    pm = peftfx.trace(_model(arch), {"input_ids": _ids()})
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    by_key = {s.key: s for s in sites}
    for layer in (0, 1):
        s = by_key[path.format(layer)]
        assert s.roles == {"attn.q", "attn.k", "attn.v", "attn.qkv"}
        for role, want in zip(("attn.q", "attn.k", "attn.v"), rows):
            assert torch.equal(_site_rows(s.slices[role]), want), (role, s.slices[role])


def _hand_lora(model, path: str, pieces, scaling: float):
    """A copy of the HF model with ``W[rows] += s·B Aᵀ…`` per slice (rows, A [r, in], B [rows, r])."""
    ref = copy.deepcopy(model)
    lin = ref.get_submodule(path)
    with torch.no_grad():
        for rows, a, b in pieces:
            lin.weight[rows] += scaling * (b @ a)
    return ref


@pytest.mark.parametrize("arch", list(ARCHS))
def test_split_lora_on_q_and_v_only(arch):
    _, path, (q_rows, _, v_rows) = ARCHS[arch]
    base, ids = _model(arch), _ids()
    rule = LoRA(rank=R, alpha=8, fused="split", targets=select.role("attn.q", "attn.v"))
    peft = peftfx.apply(copy.deepcopy(base), rule, {"input_ids": ids})
    # one pair per selected slice: rank·(in + slice rows) each, per layer
    assert peftfx.trainable_parameters(peft)[0] == 2 * (R * (H + len(q_rows)) + R * (H + len(v_rows)))
    ref = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    for layer in (0, 1):
        ad = peft.get_submodule(path.format(layer) + ".lora")
        with torch.no_grad():
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.1)
        a, b = ad.lora_A.detach(), ad.lora_B.detach()
        nq = len(q_rows)
        ref = _hand_lora(ref, path.format(layer), [(q_rows, a[:R], b[:nq]), (v_rows, a[R:], b[nq:])], rule.scaling)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = peft(input_ids=ids).logits
        assert (got - want).abs().max().item() < TOL
        assert (got - base(input_ids=ids).logits).abs().max().item() > 1e-4     # the update is not a no-op
        merged = peftfx.merge(peft)
        assert (merged(input_ids=ids).logits - want).abs().max().item() < TOL
    for layer in (0, 1):                               # merged weight = the hand-written one, rows of k untouched
        w = merged.get_parameter(path.format(layer) + ".weight")
        w_ref = ref.get_submodule(path.format(layer)).weight
        assert (w - w_ref).abs().max().item() < 1e-6


@pytest.mark.parametrize("arch", list(ARCHS))
def test_ia3_default_scales_only_k_and_v_rows(arch):
    _, path, (_, k_rows, v_rows) = ARCHS[arch]
    base, ids = _model(arch), _ids()
    peft = peftfx.apply(copy.deepcopy(base), IA3(), {"input_ids": ids})      # attn.k, attn.v, mlp.down
    kv = torch.sort(torch.cat([k_rows, v_rows])).values
    ref = copy.deepcopy(base)
    g = torch.Generator().manual_seed(9)
    for layer in (0, 1):
        ad = peft.get_submodule(path.format(layer) + ".ia3")
        assert ad.ia3_l.numel() == len(kv)
        l = 1 + 0.3 * torch.randn(len(kv), generator=g)
        with torch.no_grad():
            ad.ia3_l.copy_(l)
            lin = ref.get_submodule(path.format(layer))
            lin.weight[kv] *= l[:, None]
            if lin.bias is not None:
                lin.bias[kv] *= l
    downs = [n for n, rec in peft.peft_info.adapters.items() if "mlp.down" in rec.site["roles"]]
    assert len(downs) == 2
    with torch.no_grad():
        for name in downs:                                # the MLP's inner activation (down's input)
            ad = peft.get_submodule(name)
            l = 1 + 0.3 * torch.randn(ad.ia3_l.shape, generator=g)
            ad.ia3_l.copy_(l)
            ref.get_submodule(name.rsplit(".", 1)[0]).weight.mul_(l[None, :])
        want = ref(input_ids=ids).logits
        assert (peft(input_ids=ids).logits - want).abs().max().item() < TOL
        assert (peftfx.merge(peft)(input_ids=ids).logits - want).abs().max().item() < TOL


@pytest.mark.parametrize("arch,targets", [("phi3", ["qkv_proj"]), ("gpt_neox", ["query_key_value"])])
def test_joint_lora_on_fused_qkv_matches_hf_peft(arch, targets):
    from peft import LoraConfig, get_peft_model

    _, path, _ = ARCHS[arch]
    base, ids = _model(arch), _ids()
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=R, alpha=8, targets=select.role("attn.qkv")),
                        {"input_ids": ids})
    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in (0, 1):
            mod = hf.base_model.model.get_submodule(path.format(layer))
            mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=g) * 0.1)
            ad = ours.get_submodule(path.format(layer) + ".lora")
            ad.lora_A.copy_(mod.lora_A["default"].weight)
            ad.lora_B.copy_(mod.lora_B["default"].weight)
        assert peftfx.trainable_parameters(ours)[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
        a, b = hf(input_ids=ids).logits, ours(input_ids=ids).logits
    assert (a - b).abs().max().item() < TOL


def test_phi3_gate_up_slices_and_split_lora_on_up_only():
    base, ids = _model("phi3"), _ids()
    pm = peftfx.trace(copy.deepcopy(base), {"input_ids": ids})
    sites = {s.key: s for s in find_sites(pm)}
    assign_roles(pm.graph, list(sites.values()))
    s = sites["model.layers.0.mlp.gate_up_proj"]
    # Phi3: gate, up = gate_up.chunk(2, -1); down(up * act(gate))
    assert s.roles == {"mlp.gate", "mlp.up"} and s.slices == {"mlp.gate": (0, 128), "mlp.up": (128, 256)}
    assert sites["model.layers.0.mlp.down_proj"].roles == {"mlp.down"}
    rule = LoRA(rank=R, alpha=8, fused="split", targets=select.role("mlp.up"))
    peft = peftfx.apply(copy.deepcopy(base), rule, {"input_ids": ids})
    assert peftfx.trainable_parameters(peft)[0] == 2 * R * (H + 128)
    ref = copy.deepcopy(base)
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp.gate_up_proj"
        ad = peft.get_submodule(p + ".lora")
        with torch.no_grad():
            torch.nn.init.normal_(ad.lora_B, std=0.1)
        ref = _hand_lora(ref, p, [(torch.arange(128, 256), ad.lora_A.detach(), ad.lora_B.detach())], rule.scaling)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert (peft(input_ids=ids).logits - want).abs().max().item() < TOL
        assert (peftfx.merge(peft)(input_ids=ids).logits - want).abs().max().item() < TOL


def test_split_lora_on_interleaved_rows_saves_and_loads(tmp_path):
    base, ids = _model("gpt_neox"), _ids()
    rule = LoRA(rank=R, alpha=8, fused="split", targets=select.role("attn.q", "attn.v"))
    peft = peftfx.apply(copy.deepcopy(base), rule, {"input_ids": ids})
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        want = peft(input_ids=ids).logits
    peftfx.save_adapter(peft, tmp_path / "a")
    back = peftfx.load_adapter(copy.deepcopy(base), tmp_path / "a", example_inputs={"input_ids": ids})
    mod = back.get_submodule("gpt_neox.layers.0.attention.query_key_value.lora")
    assert [torch.equal(_site_rows(sp), w) for sp, w in zip(mod.spans, (_interleaved(0), _interleaved(2)))] \
        == [True, True]
    with torch.no_grad():
        assert (back(input_ids=ids).logits - want).abs().max().item() < TOL


class _Interleaved(torch.nn.Module):
    """Hand-written attention: fused qkv laid out per head, sizes read off the projection's output, partial
    rotary on q and k (half of each head), as GPT-NeoX does."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H, 3 * H)
        self.o = torch.nn.Linear(H, H)

    def forward(self, x):
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        q, k, v = qkv.view(b, s, HEADS, 3 * D).transpose(1, 2).chunk(3, dim=-1)
        pos = torch.arange(s, dtype=x.dtype)[:, None] * torch.ones(D // 4)
        cos, sin = torch.cat([pos.cos(), pos.cos()], -1), torch.cat([pos.sin(), pos.sin()], -1)

        def rope(t):
            rot, keep = t[..., : D // 2], t[..., D // 2:]
            half = torch.cat([-rot[..., D // 4:], rot[..., : D // 4]], -1)
            return torch.cat([rot * cos + half * sin, keep], -1)

        y = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, H))


def test_rows_through_partial_rotary_with_sizes_read_off_the_projection():
    pm = peftfx.trace(_Interleaved(), (torch.randn(2, 8, H),))
    sites = {s.key: s for s in find_sites(pm)}
    assign_roles(pm.graph, list(sites.values()))
    s = sites["qkv"]
    for role, which in (("attn.q", 0), ("attn.k", 1), ("attn.v", 2)):
        assert torch.equal(_site_rows(s.slices[role]), _interleaved(which)), role
    assert sites["o"].roles == {"attn.o"}
