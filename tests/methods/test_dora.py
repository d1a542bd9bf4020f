"""DoRA: parity with Hugging Face PEFT (LoRA with use_dora; tensors copied across) in outputs and gradients,
identity when untrained, merge == unmerged, unmerge restores, checkpoint round trip, data form."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx import DoRA, select
from tests import models as M

TOL = 1e-5  # float32


def _pair(arch, targets, rank=4, alpha=8, **kw):
    """(HF PEFT DoRA model, peftfx DoRA model) on two copies of one base, with HF's A, random B and a
    perturbed magnitude copied into ours; returns them and the input ids."""
    from peft import LoraConfig, get_peft_model

    ids = M.ids()
    hf = get_peft_model(getattr(M, arch)(), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                       use_dora=True, fan_in_fan_out=arch == "gpt2", **kw))
    ours = peftfx.apply(getattr(M, arch)(), DoRA(rank=rank, alpha=alpha, targets=select.name(*targets),
                                                 rslora=kw.get("use_rslora", False)), {"input_ids": ids})
    hp = dict(hf.named_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ours.peft_info.adapters:
            mod, pre = ours.get_submodule(name), "base_model.model." + name[: -len(".dora")] + "."
            assert torch.allclose(mod.dora_magnitude, hp[pre + "lora_magnitude_vector.default.weight"], atol=1e-6)
            hp[pre + "lora_B.default.weight"].copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.3)
            hp[pre + "lora_magnitude_vector.default.weight"].mul_(torch.rand(mod.dora_magnitude.shape,
                                                                            generator=g) + 0.5)
            mod.lora_A.copy_(hp[pre + "lora_A.default.weight"])
            mod.lora_B.copy_(hp[pre + "lora_B.default.weight"])
            mod.dora_magnitude.copy_(hp[pre + "lora_magnitude_vector.default.weight"])
    return hf.eval(), ours.eval(), ids


@pytest.mark.parametrize("arch,targets,kw", [
    ("llama", ["q_proj", "v_proj", "down_proj"], {}),
    ("llama", ["q_proj", "o_proj"], {"use_rslora": True}),
    ("gpt2", ["c_attn", "c_proj"], {}),            # Conv1D ([in, out] weights) with biases
])
def test_matches_hf_peft_outputs(arch, targets, kw):
    hf, ours, ids = _pair(arch, targets, **kw)
    with torch.no_grad():
        ref, out = hf(input_ids=ids).logits, ours(input_ids=ids).logits
        base = getattr(M, arch)()(input_ids=ids).logits
    assert (ref - base).abs().max().item() > 1e-2          # the adapter does something
    assert (out - ref).abs().max().item() < TOL


def test_matches_hf_peft_gradients():
    """Same loss and same gradients for A, B and the magnitude (the norm is detached in both)."""
    hf, ours, ids = _pair("llama", ["q_proj", "v_proj"])
    hf(input_ids=ids).logits.square().mean().backward()
    ours(input_ids=ids).logits.square().mean().backward()
    hp = dict(hf.named_parameters())
    worst = 0.0
    for name in ours.peft_info.adapters:
        mod, pre = ours.get_submodule(name), "base_model.model." + name[: -len(".dora")] + "."
        for ours_p, hf_name in ((mod.lora_A, "lora_A.default.weight"), (mod.lora_B, "lora_B.default.weight"),
                                (mod.dora_magnitude, "lora_magnitude_vector.default.weight")):
            ref = hp[pre + hf_name].grad
            assert ref is not None and ref.abs().max().item() > 0
            worst = max(worst, (ours_p.grad - ref).abs().max().item() / ref.abs().max().item())
    assert worst < 1e-4


def test_untrained_is_identity_and_only_adapter_trains():
    model, ids = M.llama(), M.ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    pm = peftfx.apply(model, DoRA(rank=4, alpha=8), {"input_ids": ids})
    with torch.no_grad():
        assert (pm(input_ids=ids).logits - ref).abs().max().item() < TOL
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "dora_magnitude") for n in trainable)
    # magnitude starts at the row norms of W₀ ([out, in] view)
    q = pm.get_submodule("model.layers.0.self_attn.q_proj.dora")
    w = model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q.dora_magnitude, torch.linalg.norm(w, dim=1), atol=1e-6)


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "v_proj", "gate_proj"]), ("gpt2", ["c_attn"])])
def test_merge_equals_unmerged_and_unmerge_restores(arch, targets):
    _, ours, ids = _pair(arch, targets)
    with torch.no_grad():
        out = ours(input_ids=ids).logits
    site = next(iter(ours.peft_info.adapters.values())).site["weight"]
    w0 = ours.get_parameter(site).detach().clone()
    merged = peftfx.merge(ours)
    assert not any(n.op == "call_module" for n in merged.graph.nodes)
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - out).abs().max().item() < TOL
    assert (merged.get_parameter(site) - w0).abs().max().item() > 1e-3
    restored = peftfx.unmerge(merged)
    assert (restored.get_parameter(site) - w0).abs().max().item() < 1e-5
    with torch.no_grad():
        assert (restored(input_ids=ids).logits - out).abs().max().item() < TOL


def test_checkpoint_round_trip_and_data_form(tmp_path):
    _, ours, ids = _pair("llama", ["q_proj", "v_proj"])
    peftfx.save_adapter(ours, tmp_path / "a")
    back = peftfx.load_adapter(M.llama(), tmp_path / "a", {"input_ids": ids}).eval()
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item() < TOL
    rule = peftfx.rules_from_data({"method": "dora", "rank": 2, "alpha": 4, "targets": {"role": "attn.v"}})[0]
    assert isinstance(rule, DoRA) and rule.scaling == 2.0
    assert peftfx.rules_from_data(rule.to_dict())[0] == rule


def test_bad_options_and_embedding_site_are_refused():
    with pytest.raises(peftfx.RuleError, match="rank"):
        DoRA(rank=0)
    with pytest.raises(peftfx.RuleError, match="dropout"):
        DoRA(dropout=1.0)
    with pytest.raises(peftfx.NoMatchError, match="linear weights only"):
        peftfx.apply(M.llama(), DoRA(targets=select.role("embed")), {"input_ids": M.ids()})


def test_merge_on_tied_head_leaves_the_embedding_alone():
    """GPT-2's lm_head reads the embedding matrix; DoRA there merges into a private copy."""
    model, ids = M.gpt2(), M.ids()
    wte = model.transformer.wte.weight.detach().clone()
    pm = peftfx.apply(model, DoRA(rank=4, targets=select.name("lm_head", "c_attn")), {"input_ids": ids}).eval()
    with torch.no_grad():
        for mod in pm.adapter_modules().values():
            mod.lora_B.normal_()
            mod.dora_magnitude.mul_(1.3)
        out = pm(input_ids=ids).logits
        for inplace in (False, True):
            merged = peftfx.merge(pm, inplace=inplace)
            assert (merged(input_ids=ids).logits - out).abs().max().item() < TOL
            restored = peftfx.unmerge(merged, inplace=inplace)
            assert (restored(input_ids=ids).logits - out).abs().max().item() < TOL
    assert torch.equal(model.transformer.wte.weight, wte)


def test_training_mode_dropout_matches_hf_peft():
    """With dropout active HF PEFT recomputes the base term on the dropped input; same RNG stream → same output."""
    from peft import LoraConfig, get_peft_model

    ids = M.ids()
    hf = get_peft_model(M.llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              use_dora=True, lora_dropout=0.3))
    ours = peftfx.apply(M.llama(), DoRA(rank=4, alpha=8, dropout=0.3, targets=select.name("q_proj", "v_proj")),
                        {"input_ids": ids})
    hp = dict(hf.named_parameters())
    with torch.no_grad():
        for name, mod in ours.adapter_modules().items():
            pre = "base_model.model." + name[: -len(".dora")] + "."
            hp[pre + "lora_B.default.weight"].normal_()
            mod.lora_A.copy_(hp[pre + "lora_A.default.weight"])
            mod.lora_B.copy_(hp[pre + "lora_B.default.weight"])
    hf.train()
    ours.train()
    torch.manual_seed(5)
    ref = hf(input_ids=ids).logits
    torch.manual_seed(5)
    out = ours(input_ids=ids).logits
    assert (out - ref).abs().max().item() < TOL
    torch.manual_seed(6)
    assert (ours(input_ids=ids).logits - ref).abs().max().item() > 1e-3       # dropout is really on
