"""LoRA on ``nn.MultiheadAttention``: its in-projection (``in_proj_weight`` [3E, E], site ``mha`` with q/k/v row
slices) and its out-projection (site ``mha.out_proj``), against Hugging Face PEFT's MultiheadAttention LoRA
(trainable counts, outputs, HF folders both ways), exact merge, slices by role, cross-attention named as
unsupported.

HF PEFT 0.21.2 adds the out-projection's ΔW twice in its forward and merge (``MultiheadAttention.merge`` writes
W + ΔW, then ``out_proj.merge()`` adds ΔW again; huggingface/peft#3774). peftfx computes W + ΔW: the tests compare
the in-projection with HF directly, the whole module with a hand-merged ``nn.MultiheadAttention``, and check that
HF's output is either that reference or peftfx's with the out-projection's B doubled.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftfx
from peftfx import IA3, LoRA, select

TOL = 1e-5
E, HEADS, VOCAB = 16, 4, 50


class AttnNet(nn.Module):
    def __init__(self, need_weights: bool = True, batch_first: bool = True):
        super().__init__()
        self.need_weights, self.batch_first = need_weights, batch_first
        self.emb = nn.Embedding(VOCAB, E)
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.norm = nn.LayerNorm(E)
        self.fc = nn.Linear(E, 5)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a = self.mha(h, h, h, need_weights=self.need_weights)[0]
        out = self.fc(self.norm(h + a))
        return out if self.batch_first else out.transpose(0, 1)


def _net(seed: int = 0, **kw) -> AttnNet:
    torch.manual_seed(seed)
    return AttnNet(**kw).eval()


IDS = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


def _run(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids)


def _apply(model, rule):
    return peftfx.apply(model, rule, {"input_ids": IDS})


def _hf(model, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["mha"], **kw})).eval()


def _hf_layers(hf) -> dict[str, nn.Module]:
    """HF's LoRA layers by peftfx site key: ``mha`` (in-projection) and ``mha.out_proj``."""
    out = {}
    for name, mod in hf.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name.replace("base_model.model.", "", 1).replace(".base_layer", "")] = mod
    return out


def _randomise_and_copy(hf, ours) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, mod in _hf_layers(hf).items():
            b = mod.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            ad = ours.get_submodule(key + ".lora")
            ad.lora_A.copy_(mod.lora_A["default"].weight)
            ad.lora_B.copy_(b)


def _hand_merged(base: AttnNet, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> AttnNet:
    """The base with W + s·B·A written into in_proj_weight and out_proj.weight: the reference semantics."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for key, (a, b, s) in layers.items():
            w = ref.mha.in_proj_weight if key == "mha" else ref.mha.out_proj.weight
            w += s * b @ a
    return ref


def _pairs(ours) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    return {k: (ours.get_submodule(k + ".lora").lora_A, ours.get_submodule(k + ".lora").lora_B,
                ours.get_submodule(k + ".lora").scaling) for k in ("mha", "mha.out_proj")}


# ------------------------------------------------------------------------------------------ sites, roles
@pytest.mark.parametrize("need_weights", [True, False])        # eager bmm → softmax → bmm, or SDPA
@pytest.mark.parametrize("batch_first", [True, False])
def test_in_projection_is_a_site_with_qkv_slices_and_out_proj_is_attn_o(need_weights, batch_first):
    sites = {s.key: s for s in peftfx.inspect(_net(need_weights=need_weights, batch_first=batch_first), None,
                                              {"input_ids": IDS}).plan.sites}
    inp, out = sites["mha"], sites["mha.out_proj"]
    assert (inp.weight, inp.weight_shape, inp.module_type) == ("mha.in_proj_weight", (3 * E, E), "MultiheadAttention")
    assert inp.roles == {"attn.q", "attn.k", "attn.v", "attn.qkv"}
    assert inp.slices == {"attn.q": (0, E), "attn.k": (E, 2 * E), "attn.v": (2 * E, 3 * E)}
    assert (out.weight, out.roles, out.module_type) == ("mha.out_proj.weight", {"attn.o"}, "MultiheadAttention")


def test_roles_found_in_training_with_attention_dropout():
    """In training the returned attention weights are the dropout's output: the probabilities fork after dropout."""
    torch.manual_seed(0)
    model = AttnNet()
    model.mha.dropout = 0.1
    sites = {s.key: s for s in peftfx.inspect(model.train(), None, {"input_ids": IDS}).plan.sites}
    assert sites["mha"].slices == {"attn.q": (0, E), "attn.k": (E, 2 * E), "attn.v": (2 * E, 3 * E)}
    assert sites["mha.out_proj"].roles == {"attn.o"}


# ------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("targets", [select.type("MultiheadAttention"), select.name("mha", "mha.out_proj"),
                                     select.role("attn.qkv", "attn.o")])
def test_lora_on_multihead_attention_matches_hf_peft(targets):
    base = _net()
    ours = _apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=targets))
    assert sorted(ours.peft_info.adapters) == ["mha.lora", "mha.out_proj.lora"]
    hf = _hf(copy.deepcopy(base))
    _randomise_and_copy(hf, ours)
    assert peftfx.trainable_parameters(ours)[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad) \
        == 4 * (E + 3 * E) + 4 * (E + E)
    ref = _run(_hand_merged(base, _pairs(ours)))
    out = _run(ours)
    assert (out - ref).abs().max().item() < TOL and (out - _run(base)).abs().max().item() > 1e-2
    hf_out = _run(hf)
    with torch.no_grad():                        # HF ≤ 0.21.2 adds the out-projection's ΔW twice (peft#3774)
        ours.get_submodule("mha.out_proj.lora").lora_B.mul_(2)
        doubled = _run(ours)
        ours.get_submodule("mha.out_proj.lora").lora_B.div_(2)
    assert min((hf_out - ref).abs().max().item(), (hf_out - doubled).abs().max().item()) < TOL
    with torch.no_grad():                        # the in-projection alone: HF and peftfx agree exactly
        _hf_layers(hf)["mha.out_proj"].lora_B["default"].weight.zero_()
        ours.get_submodule("mha.out_proj.lora").lora_B.zero_()
    assert (_run(hf) - _run(ours)).abs().max().item() < TOL


def test_lora_on_multihead_attention_merges_and_unmerges_exactly():
    base = _net()
    ours = _apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=select.type("MultiheadAttention")))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    out = _run(ours)
    merged = peftfx.merge(ours)
    assert not [n for n in merged.graph.nodes if n.op == "call_module" and n.target.endswith(".lora")]
    assert (_run(merged) - out).abs().max().item() < TOL
    want = _hand_merged(base, _pairs(ours))
    assert (merged.get_parameter("mha.in_proj_weight") - want.mha.in_proj_weight).abs().max().item() < 1e-6
    back = peftfx.unmerge(merged)
    assert (back.get_parameter("mha.in_proj_weight") - base.mha.in_proj_weight).abs().max().item() < 1e-6
    assert (back.get_parameter("mha.out_proj.weight") - base.mha.out_proj.weight).abs().max().item() < 1e-6


def test_roles_pick_q_and_v_rows_of_the_in_projection():
    base = _net()
    ours = _apply(copy.deepcopy(base), LoRA(rank=2, fused="split"))         # default targets: attn.q, attn.v
    ad = ours.get_submodule("mha.lora")
    assert ad.spans == [(0, E), (2 * E, 3 * E)] and list(ours.peft_info.adapters) == ["mha.lora"]
    with torch.no_grad():
        ad.lora_B.normal_()
    assert ad.delta()[E:2 * E].abs().max().item() == 0                     # k rows untouched
    assert (_run(peftfx.merge(ours)) - _run(ours)).abs().max().item() < TOL
    ia3 = _apply(copy.deepcopy(base), IA3())                                # default: attn.k, attn.v (no MLP here)
    mod = ia3.get_submodule("mha.ia3")
    assert mod.spans == [(E, 2 * E), (2 * E, 3 * E)] and mod.ia3_l.numel() == 2 * E
    with torch.no_grad():
        mod.ia3_l.uniform_(0.5, 1.5)
    assert (_run(peftfx.merge(ia3)) - _run(ia3)).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------ HF folders
def test_hf_multihead_attention_folder_both_ways(tmp_path):
    from peft import PeftModel

    base = _net()
    hf = _hf(copy.deepcopy(base))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = peftfx.load_adapter(copy.deepcopy(base), tmp_path / "hf", {"input_ids": IDS}).eval()
    assert sorted(ours.peft_info.adapters) == ["mha.lora", "mha.out_proj.lora"]
    for key, mod in _hf_layers(hf).items():
        assert torch.equal(ours.get_submodule(key + ".lora").lora_A, mod.lora_A["default"].weight)
        assert torch.equal(ours.get_submodule(key + ".lora").lora_B, mod.lora_B["default"].weight)
    assert (_run(ours) - _run(_hand_merged(base, _pairs(ours)))).abs().max().item() < TOL
    peftfx.save_adapter(ours, tmp_path / "back", format="hf")
    again = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    assert (_run(again) - _run(hf)).abs().max().item() < TOL                  # HF reads back what HF wrote
    config = (tmp_path / "back" / "adapter_config.json").read_text()
    assert '"target_modules": [\n    "mha"\n  ]' in config


def test_hf_save_refuses_what_hf_cannot_express(tmp_path):
    half = _apply(_net(), LoRA(rank=2, targets=select.name("mha")))
    with pytest.raises(peftfx.CheckpointError, match="LoRA on mha but not on mha.out_proj; HF PEFT adapts"):
        peftfx.save_adapter(half, tmp_path / "a", format="hf")
    split = _apply(_net(), [LoRA(rank=2, fused="split"), LoRA(rank=2, targets=select.role("attn.o"))])
    with pytest.raises(peftfx.CheckpointError, match="fused='split'"):
        peftfx.save_adapter(split, tmp_path / "b", format="hf")
    two = _apply(_net(), [LoRA(rank=2, targets=select.name("mha")), LoRA(rank=4, targets=select.role("attn.o"))])
    with pytest.raises(peftfx.CheckpointError, match="one rank and one alpha"):
        peftfx.save_adapter(two, tmp_path / "c", format="hf")
    peftfx.save_adapter(two, tmp_path / "d")                                  # the peftfx format holds it


# --------------------------------------------------------------------------------------- cross-attention
class CrossNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E)
        self.xattn = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.xattn(h, h[:, :3], h[:, :3])[0]           # query is not key/value: in_proj is split


def test_cross_attention_multihead_attention_is_named_as_unsupported():
    torch.manual_seed(0)
    with pytest.raises(peftfx.NoMatchError, match=r"'xattn' \(MultiheadAttention\): this nn.MultiheadAttention is "
                                                  r"called with a query that is not its key and value"):
        _apply(CrossNet(), LoRA(rank=2, targets=select.name("xattn")))
    ours = _apply(CrossNet(), LoRA(rank=2, targets=select.name("xattn.out_proj")))
    assert list(ours.peft_info.adapters) == ["xattn.out_proj.lora"]
