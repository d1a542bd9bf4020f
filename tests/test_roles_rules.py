"""Roles read from the graph on five architectures plus a hand-written model; selectors and rules as data."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import peftfx
from peftfx import LoRA, select
from peftfx.methods import rule_from_dict, rules_from_data
from peftfx.roles import assign_roles
from peftfx.sites import find_sites
from tests import models as M


def _roles(model, kw):
    pm = peftfx.trace(model, kw)
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    return {s.key: sorted(s.roles) for s in sites}, {s.key: s for s in sites}


def test_roles_gpt2_fused_qkv_with_slices():
    roles, sites = _roles(M.gpt2(), {"input_ids": M.ids()})
    assert roles["transformer.h.0.attn.c_attn"] == ["attn.k", "attn.q", "attn.qkv", "attn.v"]
    assert sites["transformer.h.1.attn.c_attn"].slices == {"attn.q": (0, 64), "attn.k": (64, 128), "attn.v": (128, 192)}
    assert roles["transformer.h.0.attn.c_proj"] == ["attn.o"]
    assert roles["transformer.h.0.mlp.c_fc"] == ["mlp.up"]
    assert roles["transformer.h.0.mlp.c_proj"] == ["mlp.down"]
    assert roles["transformer.wte"] == ["embed"] and roles["transformer.wpe"] == ["embed.position"]
    assert roles["lm_head"] == ["head"]


def test_roles_llama_gqa_rotary_gated_mlp():
    roles, _ = _roles(M.llama(), {"input_ids": M.ids()})
    for i in (0, 1):
        p = f"model.layers.{i}"
        assert roles[f"{p}.self_attn.q_proj"] == ["attn.q"]
        assert roles[f"{p}.self_attn.k_proj"] == ["attn.k"]
        assert roles[f"{p}.self_attn.v_proj"] == ["attn.v"]
        assert roles[f"{p}.self_attn.o_proj"] == ["attn.o"]
        assert roles[f"{p}.mlp.gate_proj"] == ["mlp.gate"]
        assert roles[f"{p}.mlp.up_proj"] == ["mlp.up"]
        assert roles[f"{p}.mlp.down_proj"] == ["mlp.down"]
    assert roles["model.embed_tokens"] == ["embed"] and roles["lm_head"] == ["head"]


def test_roles_bert_t5_vit():
    ids = M.ids()
    roles, _ = _roles(M.bert(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    p = "bert.encoder.layer.1"
    assert [roles[f"{p}.attention.self.{n}"] for n in ("query", "key", "value")] == [["attn.q"], ["attn.k"], ["attn.v"]]
    assert roles[f"{p}.attention.output.dense"] == ["attn.o"]
    assert roles[f"{p}.intermediate.dense"] == ["mlp.up"] and roles[f"{p}.output.dense"] == ["mlp.down"]
    assert roles["bert.embeddings.word_embeddings"] == ["embed"] and roles["classifier"] == ["head"]
    assert roles["bert.pooler.dense"] == []           # a tanh projection feeding the head, not an MLP
    roles, _ = _roles(M.t5(), {"input_ids": ids, "decoder_input_ids": ids[:, :5]})
    for p in ("encoder.block.0.layer.0.SelfAttention", "decoder.block.1.layer.0.SelfAttention",
              "decoder.block.1.layer.1.EncDecAttention"):
        assert [roles[f"{p}.{n}"] for n in "qkvo"] == [["attn.q"], ["attn.k"], ["attn.v"], ["attn.o"]]
    assert roles["decoder.block.0.layer.2.DenseReluDense.wi"] == ["mlp.up"]
    assert roles["decoder.block.0.layer.2.DenseReluDense.wo"] == ["mlp.down"]
    assert roles["lm_head"] == ["head"]
    roles, _ = _roles(M.vit(), {"pixel_values": torch.randn(2, 3, 32, 32)})
    names = {r[0]: k for k, r in roles.items() if r and k.startswith("vit.layers.0.")}
    assert set(names) == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"}
    assert roles["classifier"] == ["head"]


@pytest.mark.parametrize("arch,qkv,o,up,down", [
    ("falcon", "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ("bloom", "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
])
def test_roles_beyond_the_named_architectures(arch, qkv, o, up, down):
    """Falcon: x @ W.T matmuls (no aten.linear), parallel attention/MLP. BLOOM: eager baddbmm scores with ALiBi
    and an additive mask before the softmax. No name table: the same data-flow rules label both."""
    roles, sites = _roles(getattr(M, arch)(), {"input_ids": M.ids()})
    for i in (0, 1):
        p = f"transformer.h.{i}"
        assert roles[f"{p}.{qkv}"] == ["attn.k", "attn.q", "attn.qkv", "attn.v"]
        assert roles[f"{p}.{o}"] == ["attn.o"]
        assert roles[f"{p}.{up}"] == ["mlp.up"] and roles[f"{p}.{down}"] == ["mlp.down"]
        assert sites[f"{p}.{qkv}"].layer == i
    assert roles["transformer.word_embeddings"] == ["embed"]
    assert roles["lm_head"] == ["head"]


def _parallel_block(arch):
    import transformers as T

    torch.manual_seed(0)
    if arch == "cohere":
        return T.CohereForCausalLM(T.CohereConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=4,
                                                  intermediate_size=128)), "model.layers.{}.mlp"
    if arch == "gptj":
        return T.GPTJForCausalLM(T.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                              n_inner=128)), "transformer.h.{}.mlp"
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128,
                                                use_parallel_residual=True)), "gpt_neox.layers.{}.mlp"


@pytest.mark.parametrize("arch,mlp", [("cohere", {"gate_proj": ["mlp.gate"], "up_proj": ["mlp.up"],
                                                  "down_proj": ["mlp.down"]}),
                                      ("gptj", {"fc_in": ["mlp.up"], "fc_out": ["mlp.down"]}),
                                      ("gpt_neox", {"dense_h_to_4h": ["mlp.up"], "dense_4h_to_h": ["mlp.down"]})])
def test_parallel_residual_blocks_get_mlp_roles(arch, mlp):
    """x + attn(ln(x)) + mlp(ln(x)): the MLP output is added to ``x + attn``, whose term x feeds the MLP input."""
    model, path = _parallel_block(arch)
    roles, _ = _roles(model, {"input_ids": M.ids()})
    for i in (0, 1):
        for name, want in mlp.items():
            assert roles[f"{path.format(i)}.{name}"] == want, (i, name)
    peft = peftfx.apply(model, peftfx.IA3(), {"input_ids": M.ids()})     # IA3's default now covers the MLP too
    assert sum("mlp.down" in rec.site["roles"] for rec in peft.peft_info.adapters.values()) == 2


def test_roles_hand_written_eager_attention():
    roles, sites = _roles(M.TinyTransformer(), {"ids": M.ids(vocab=100)})
    assert roles["blocks.0.qkv"] == ["attn.k", "attn.q", "attn.qkv", "attn.v"]
    assert sites["blocks.0.qkv"].slices == {"attn.q": (0, 32), "attn.k": (32, 64), "attn.v": (64, 96)}
    assert roles["blocks.1.proj"] == ["attn.o"]
    assert (roles["blocks.1.w_gate"], roles["blocks.1.w_up"], roles["blocks.1.w_down"]) == (
        ["mlp.gate"], ["mlp.up"], ["mlp.down"])
    assert roles["tok"] == ["embed"] and roles["out"] == ["head"]


def test_one_rule_works_across_architectures():
    rule = LoRA(rank=2, targets=select.role("attn.v") & select.layer(1))
    ids = M.ids()
    for model, kw, expect in [
        (M.gpt2(), {"input_ids": ids}, ["transformer.h.1.attn.c_attn"]),
        (M.llama(), {"input_ids": ids}, ["model.layers.1.self_attn.v_proj"]),
        (M.bert(), {"input_ids": ids}, ["bert.encoder.layer.1.attention.self.value"]),
    ]:
        rep = peftfx.inspect(model, rule, kw)
        assert [s["key"] for s in rep.to_dict()["rules"][0]["sites"]] == expect


def test_selectors_compose_and_round_trip_as_data(tmp_path):
    sel = (select.name("*.mlp.*") & select.layer(range(1, 2))) | ~select.type("Linear", "Conv1D", "embedding")
    d = sel.to_dict()
    assert select.from_dict(json.loads(json.dumps(d))) == sel
    rules = [LoRA(rank=4, alpha=8, dropout=0.1, targets=sel, rslora=True), LoRA(rank=2)]
    data = [r.to_dict() for r in rules]
    assert rules_from_data(json.dumps(data)) == rules
    import yaml

    f = tmp_path / "rules.yaml"
    f.write_text(yaml.safe_dump({"rules": data}))
    assert rules_from_data(str(f)) == rules
    assert rule_from_dict({"method": "lora", "targets": ["q_proj", "v_proj"]}).targets.to_dict() == {
        "or": [{"name": "q_proj"}, {"name": "v_proj"}]}
    with pytest.raises(peftfx.RuleError, match="no option"):
        rule_from_dict({"method": "lora", "rnak": 4})
    with pytest.raises(peftfx.RuleError, match="unknown method"):
        rule_from_dict({"method": "lorax"})


def test_name_type_layer_selectors_pick_the_right_sites():
    ids = M.ids()
    kw = {"input_ids": ids}
    model = M.llama()

    def keys(sel):
        return [s["key"] for s in peftfx.inspect(model, LoRA(rank=2, targets=sel), kw).to_dict()["rules"][0]["sites"]]

    assert keys(select.name("q_proj")) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert keys(select.regex(r"model\.layers\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert keys(select.type("embedding")) == ["model.embed_tokens"]
    assert len(keys(select.layer(0) & select.role("mlp.*"))) == 3


def test_rule_matching_nothing_lists_nearest_names_and_roles():
    model = M.gpt2()
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(peftfx.NoMatchError) as e:
        peftfx.apply(model, LoRA(targets=select.name("*.c_atn")), {"input_ids": M.ids()})
    msg = str(e.value)
    assert "transformer.h.0.attn.c_attn" in msg and "attn.qkv (2)" in msg and "mlp.down (2)" in msg
    assert [p.requires_grad for p in model.parameters()] == before      # nothing changed


def test_conflicting_rules_are_an_error_naming_both():
    model = M.llama()
    rules = [LoRA(rank=2, targets=select.role("attn.q")), LoRA(rank=4, targets=select.layer(0))]
    with pytest.raises(peftfx.ConflictError, match=r"rule 0 \(lora\); rule 1 \(lora\)"):
        peftfx.apply(model, rules, {"input_ids": M.ids()})
    assert all(p.requires_grad for p in model.parameters())


@dataclasses.dataclass(frozen=True)
class _Picky(LoRA):
    """A LoRA that declines wide layers — exercises the decline path of the planner."""

    def decline(self, site):
        return f"in_features {site.in_features} > 32" if site.in_features > 32 else None


def test_inspect_does_not_change_the_model_and_reports_declines():
    model = M.llama()
    rep = peftfx.inspect(model, _Picky(rank=2, targets=select.role("attn.k")), {"input_ids": M.ids()})
    d = rep.to_dict()["rules"][0]
    assert d["sites"] == [] and len(d["declined"]) == 2 and d["declined"][0]["reason"] == "in_features 64 > 32"
    assert "declined model.layers.0.self_attn.k_proj" in str(rep)
    assert all(p.requires_grad for p in model.parameters())
    full = peftfx.inspect(model, None, {"input_ids": M.ids()})
    assert len(full.to_dict()["sites"]) == 2 * 7 + 2
