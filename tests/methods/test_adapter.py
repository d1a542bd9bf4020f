"""Houlsby adapters: HF PEFT has no Houlsby adapter, so the reference is plain PyTorch — forward hooks on the
same modules of the Hugging Face model doing the same math by hand. Identity when untrained, merge with
LoRA/IA3 (the adapter stays), checkpoints, dropout mode, training, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import peftfx
from peftfx import IA3, Adapter, LoRA, select
from tests import models as M

TOL = 1e-5
_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _randomise(pm, seed=3, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pm.adapter_modules().values():
            for name, p in m.named_parameters():
                base = 1.0 if name in ("ia3_l", "adapter_norm.weight") else 0.0
                p.copy_(base + std * torch.randn(p.shape, generator=g))


def _by_hand(mod, rule: Adapter):
    """The adapter's math written out with its tensors: y + up(act(down(norm(y)))) or y + norm(up(…(y)))."""
    Wd, bd = mod.adapter_down.weight.detach(), mod.adapter_down.bias.detach()
    Wu, bu = mod.adapter_up.weight.detach(), mod.adapter_up.bias.detach()
    n = mod.adapter_norm

    def norm(t):
        if rule.norm == "layernorm":
            mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
            return (t - mu) / torch.sqrt(var + 1e-5) * n.weight.detach() + n.bias.detach()
        if rule.norm == "rmsnorm":
            return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight.detach()
        return t

    def f(y):
        h = norm(y) if rule.norm_position == "pre" else y
        h = _ACT[rule.activation](h @ Wd.T + bd) @ Wu.T + bu
        return y + (h if rule.norm_position == "pre" else norm(h))
    return f


def _reference(base, peft, rule):
    ref = copy.deepcopy(base)
    for name, rec in peft.peft_info.adapters.items():
        if rec.method == "adapter":
            fn = _by_hand(peft.get_submodule(name), rule)
            ref.get_submodule(rec.site["path"]).register_forward_hook(lambda m, a, y, fn=fn: fn(y))
    return ref


_SITES = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj"),
          "bert": ("attention.output.dense", "output.dense")}


@pytest.mark.parametrize("arch,rule", [
    ("llama", Adapter(bottleneck=8)),
    ("llama", Adapter(bottleneck=8, activation="gelu", norm="layernorm", norm_position="pre", blocks="mlp")),
    ("llama", Adapter(bottleneck=8, activation="tanh", norm="rmsnorm", norm_position="post", blocks="attn")),
    ("gpt2", Adapter(bottleneck=4, activation="relu", norm="layernorm", norm_position="post")),   # Conv1D sites
    ("bert", Adapter(bottleneck=16, norm="rmsnorm", norm_position="pre")),
])
def test_matches_hand_written_reference_and_is_identity_untrained(arch, rule):
    base = getattr(M, arch)()
    ids = M.ids(batch=3, seq=10)
    peft = peftfx.apply(copy.deepcopy(base), rule, {"input_ids": ids})
    wanted = {"attn": _SITES[arch][:1], "mlp": _SITES[arch][1:], "both": _SITES[arch]}[rule.blocks]
    assert sorted({rec.site["path"].split(".", 4 if arch == "bert" else 3)[-1]
                   for rec in peft.peft_info.adapters.values()}) == sorted(wanted)
    with torch.no_grad():
        assert torch.equal(_logits(peft(input_ids=ids)), _logits(base(input_ids=ids)))   # up = 0: identity
    d = base.config.hidden_size
    norm_params = {"layernorm": 2 * d, "rmsnorm": d, "none": 0}[rule.norm]
    per_site = 2 * d * rule.bottleneck + d + rule.bottleneck + norm_params
    assert peftfx.trainable_parameters(peft)[0] == per_site * len(peft.peft_info.adapters)
    _randomise(peft)
    ref = _reference(base, peft, rule)
    with torch.no_grad():
        y, r = _logits(peft(input_ids=ids)), _logits(ref(input_ids=ids))
        assert (y - r).abs().max().item() < TOL
        assert (y - _logits(base(input_ids=ids))).abs().max().item() > 10 * TOL   # the adapters really act


# --------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("order", ["lora_first", "adapter_first"])
def test_merge_folds_lora_and_keeps_the_adapter(order):
    base = M.llama()
    ids = M.ids()
    lora = LoRA(rank=2, alpha=4, targets=select.role("attn.q", "attn.v", "attn.o"))
    rules = [lora, Adapter(bottleneck=8)] if order == "lora_first" else [Adapter(bottleneck=8), lora]
    peft = peftfx.apply(copy.deepcopy(base), rules, {"input_ids": ids})
    _randomise(peft)
    methods = lambda pm: sorted(n.meta["peftfx"]["adapter"].rsplit(".", 1)[-1] for n in pm.graph.nodes
                                if n.op == "call_module" and "adapter" in n.meta.get("peftfx", {}))
    with torch.no_grad():
        y = peft(input_ids=ids).logits
        merged = peftfx.merge(peft)
        # LoRA on q/v always folds; LoRA on o_proj folds only when it acts before the adapter there
        kept_lora = 0 if order == "lora_first" else 2
        assert methods(merged) == ["adapter"] * 4 + ["lora"] * kept_lora
        assert (merged(input_ids=ids).logits - y).abs().max().item() < TOL
        back = peftfx.unmerge(merged)
        assert methods(back) == methods(peft)
        for k, v in base.named_parameters():
            assert (back.get_parameter(k) - v).abs().max().item() < 1e-6, k
        assert (back(input_ids=ids).logits - y).abs().max().item() < TOL


def test_ia3_input_scaling_merges_under_an_adapter_on_the_same_site():
    """IA3 scales down_proj's input; the Houlsby adapter on down_proj's output ignores that input, so merge
    can fold IA3 and rewire the adapter."""
    base = M.llama()
    ids = M.ids()
    peft = peftfx.apply(copy.deepcopy(base), [Adapter(bottleneck=8, blocks="mlp"), IA3()], {"input_ids": ids})
    _randomise(peft)
    with torch.no_grad():
        y = peft(input_ids=ids).logits
        merged = peftfx.merge(peft)
        assert all(r.merged == (r.method == "ia3") for r in merged.peft_info.adapters.values())
        assert (merged(input_ids=ids).logits - y).abs().max().item() < TOL
        assert (peftfx.unmerge(merged)(input_ids=ids).logits - y).abs().max().item() < TOL


# ------------------------------------------------------------------------------ mode, checkpoint, training
def test_dropout_follows_train_and_eval():
    base = M.llama()
    ids = M.ids()
    rule = Adapter(bottleneck=8, dropout=0.5)
    peft = peftfx.apply(copy.deepcopy(base), rule, {"input_ids": ids})
    _randomise(peft)
    with torch.no_grad():
        peft.train()
        a, b = peft(input_ids=ids).logits, peft(input_ids=ids).logits
        assert (a - b).abs().max().item() > 1e-4
        peft.eval()
        assert (peft(input_ids=ids).logits - _reference(base, peft, rule)(input_ids=ids).logits).abs().max() < TOL


def test_save_load_round_trip(tmp_path):
    base = M.gpt2()
    ids = M.ids()
    rule = Adapter(bottleneck=4, norm="layernorm", norm_position="post", activation="gelu")
    peft = peftfx.apply(copy.deepcopy(base), rule, {"input_ids": ids})
    _randomise(peft)
    peftfx.save_adapter(peft, tmp_path / "houlsby")
    again = peftfx.load_adapter(copy.deepcopy(base), tmp_path / "houlsby", {"input_ids": ids})
    assert again.peft_info.rules == [rule]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, peft(input_ids=ids).logits)


def test_short_training_run_lowers_loss():
    ids = M.ids(batch=4, seq=16, seed=5)
    peft = peftfx.apply(M.llama_wide_init(), Adapter(bottleneck=16), {"input_ids": ids}).train()
    losses = M.next_token_losses(peft, ids, lr=1e-2)
    assert losses[-1] < 0.75 * losses[0], losses[::6]
    assert all(p.grad is None for p in peft.parameters() if not p.requires_grad)


# -------------------------------------------------------------------------------------------- bad input
def test_model_without_blocks_is_refused_before_any_change():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.raises(peftfx.NoMatchError) as err:
        peftfx.apply(mlp, Adapter(bottleneck=4), (torch.randn(3, 8),))
    assert "lacks: attn.o, mlp.down" in str(err.value)
    assert all(p.requires_grad for p in mlp.parameters())


@pytest.mark.parametrize("kw,match", [
    (dict(bottleneck=0), "bottleneck"), (dict(activation="swish"), "activation"), (dict(dropout=1.0), "dropout"),
    (dict(norm="batchnorm"), "norm"), (dict(norm_position="mid"), "norm_position"), (dict(blocks="ffn"), "blocks"),
])
def test_bad_options_are_clear(kw, match):
    with pytest.raises(peftfx.RuleError, match=match):
        Adapter(**kw)


def test_data_form_and_inspect():
    rule = Adapter(bottleneck=12, activation="relu", norm="rmsnorm", blocks="attn")
    assert peftfx.rules_from_data(rule.to_dict()) == [rule]
    report = peftfx.inspect(M.bert(), Adapter(targets=select.role("embed") | select.role("attn.o")),
                            {"input_ids": M.ids()}).to_dict()["rules"][0]
    assert [d["site"] for d in report["declined"]] == ["bert.embeddings.word_embeddings"]
    assert len(report["sites"]) == 2
