"""``modules_to_save`` (a trainable copy of a whole module used in place of the original) and trainable tokens (only
some rows of the token embedding train; a tied LM head shares them), each against Hugging Face PEFT on the same
weights: trainable counts equal, outputs equal within 1e-5 after the copy / rows change, HF folders both ways, merge
and merge_and_unload keep them, disable_adapter runs the original."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import peftfx
from peftfx import LoRA, RuleError, select
from peftfx.methods.modules_to_save import ModulesToSave
from peftfx.methods.trainable_tokens import TrainableTokens
from tests import models as M

TOL = 1e-5
TOKENS = [1, 2, 3, 70]


def _out(model, ids, key="logits"):
    with torch.no_grad():
        return getattr(model(input_ids=ids), key)


def _perturb(model, g, scale=0.3):
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _pair(arch, config, rules, ids):
    """(HF PEFT model, peftfx model) on one copy of the weights each, every trainable tensor of HF perturbed and
    copied into peftfx by position in the state (both list them in module order)."""
    from peft import get_peft_model

    base = getattr(M, arch)()
    hf = get_peft_model(copy.deepcopy(base), config)
    pm = peftfx.apply(copy.deepcopy(base), rules, {"input_ids": ids})
    _perturb(hf, torch.Generator().manual_seed(3))
    return base, hf.eval(), pm.eval()


def _sync(pm, hf, mapping):
    """Copy HF's trainable tensors into peftfx: ``mapping`` peftfx parameter name → HF parameter name."""
    hp = dict(hf.named_parameters())
    with torch.no_grad():
        for ours, theirs in mapping.items():
            pm.get_parameter(ours).copy_(hp[theirs].reshape(pm.get_parameter(ours).shape))


def _lora_map(pm):
    out = {}
    for n, _ in pm.named_parameters():
        if ".lora.lora_A" in n or ".lora.lora_B" in n:
            site, which = n.rsplit(".lora.", 1)
            out[n] = f"base_model.model.{site}.{which}.default.weight"
    return out


# ------------------------------------------------------------------------------------------- modules_to_save
def test_modules_to_save_matches_hf_counts_outputs_merge_and_disable():
    from peft import LoraConfig

    ids = M.ids()
    base, hf, pm = _pair("bert", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            modules_to_save=["classifier"]),
                         LoRA(rank=4, alpha=8, targets=select.name("query", "value"), modules_to_save=["classifier"]),
                         ids)
    assert [r.to_dict()["method"] for r in pm.peft_info.rules] == ["lora", "modules_to_save"]
    assert peftfx.trainable_parameters(pm)[0] == hf.get_nb_trainable_parameters()[0]
    _sync(pm, hf, _lora_map(pm) | {
        "classifier.modules_to_save.weight": "base_model.model.classifier.modules_to_save.default.weight",
        "classifier.modules_to_save.bias": "base_model.model.classifier.modules_to_save.default.bias"})
    ref = _out(hf, ids)
    assert (ref - _out(base, ids)).abs().max() > 1e-2                      # the copy changed the head
    assert (_out(pm, ids) - ref).abs().max() < TOL
    with pm.disable_adapter():                                              # the original head, untouched
        assert (_out(pm, ids) - _out(base, ids)).abs().max() < TOL
    assert torch.equal(pm.get_parameter("classifier.weight"), base.classifier.weight)
    merged = peftfx.merge(pm)
    assert (_out(merged, ids) - ref).abs().max() < TOL
    assert (_out(peftfx.unmerge(merged), ids) - ref).abs().max() < TOL
    hm = hf.merge_and_unload()
    ours = peftfx.merge_and_unload(pm)
    assert torch.allclose(ours.classifier.weight, hm.classifier.weight, atol=TOL)
    assert (_out(ours, ids) - ref).abs().max() < TOL


def test_modules_to_save_hf_folders_both_ways(tmp_path):
    """An HF SEQ_CLS folder (task_type adds the head to modules_to_save, HF writes ``classifier.weight``) loads into
    peftfx with HF's outputs; peftfx writes it back and HF loads that with the same outputs."""
    from peft import LoraConfig, PeftModel

    ids = M.ids()
    _, hf, _ = _pair("bert", LoraConfig(r=4, lora_alpha=8, target_modules=["query"], task_type="SEQ_CLS"),
                     LoRA(rank=4, targets=select.name("query")), ids)
    hf.save_pretrained(str(tmp_path / "hf"))
    ref = _out(hf, ids)
    pm = peftfx.load_adapter(M.bert(), tmp_path / "hf", {"input_ids": ids}).eval()
    assert "classifier.modules_to_save" in pm.peft_info.adapters
    assert (_out(pm, ids) - ref).abs().max() < TOL
    peftfx.save_adapter(pm, tmp_path / "back", format="hf")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    assert config["auto_mapping"]["base_model_class"] == "BertForSequenceClassification"
    back = PeftModel.from_pretrained(M.bert(), str(tmp_path / "back")).eval()
    assert (_out(back, ids) - ref).abs().max() < TOL
    peftfx.save_adapter(pm, tmp_path / "fx")                               # the peftfx format too
    again = peftfx.load_adapter(M.bert(), tmp_path / "fx", {"input_ids": ids}).eval()
    assert (_out(again, ids) - ref).abs().max() < TOL


def test_modules_to_save_as_its_own_rule_with_another_method():
    """``ModulesToSave`` is a rule like any other: with IA3, on GPT-2's Conv1D (transposed) head-less MLP."""
    ids = M.ids()
    base = M.gpt2()
    pm = peftfx.apply(copy.deepcopy(base), [peftfx.IA3(), ModulesToSave(names=("h.1.mlp.c_fc",))],
                      {"input_ids": ids}).eval()
    copy_ = pm.get_submodule("transformer.h.1.mlp.c_fc.modules_to_save")
    assert copy_.weight.shape == base.transformer.h[1].mlp.c_fc.weight.shape and copy_.weight.requires_grad
    with torch.no_grad():
        copy_.weight.mul_(1.5)
        ref_model = copy.deepcopy(base)
        ref_model.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
    assert (_out(pm, ids) - _out(ref_model, ids)).abs().max() < TOL


def test_modules_to_save_refuses_a_module_with_parameters_no_site_reads():
    with pytest.raises(RuleError, match="LayerNorm"):
        peftfx.apply(M.bert(), ModulesToSave(names=("attention.output",)), {"input_ids": M.ids()})
    with pytest.raises(RuleError, match="names"):
        ModulesToSave(names=())


# ------------------------------------------------------------------------------------------- trainable tokens
def _token_ids():
    return torch.tensor([[1, 5, 2, 3, 9, 1, 70, 2], [4, 3, 3, 2, 1, 8, 70, 10]])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trainable_tokens_match_hf_tied_and_untied(arch):
    """GPT-2 ties its LM head to the token embedding (HF wraps the head too and it shares the rows), Llama here does
    not; counts, outputs, merge and merge_and_unload equal HF PEFT's."""
    from peft import LoraConfig

    ids = _token_ids()
    target = {"gpt2": "c_attn", "llama": "q_proj"}[arch]
    base, hf, pm = _pair(arch, LoraConfig(r=4, lora_alpha=8, target_modules=[target], trainable_token_indices=TOKENS,
                                          fan_in_fan_out=arch == "gpt2"),
                         LoRA(rank=4, alpha=8, targets=select.name(target), trainable_token_indices=TOKENS), ids)
    tied = arch == "gpt2"
    heads = [n for n in pm.peft_info.adapters if n.endswith("trainable_tokens") and "head" in n]
    assert len(heads) == int(tied)
    assert peftfx.trainable_parameters(pm)[0] == hf.get_nb_trainable_parameters()[0]
    embed = "transformer.wte" if arch == "gpt2" else "model.embed_tokens"
    _sync(pm, hf, _lora_map(pm) | {
        f"{embed}.trainable_tokens.token_delta":
            f"base_model.model.{embed}.token_adapter.trainable_tokens_delta.default"})
    ref = _out(hf, ids)
    assert (ref - _out(base, ids)).abs().max() > 1e-2
    assert (_out(pm, ids) - ref).abs().max() < TOL
    with pm.disable_adapter():
        assert (_out(pm, ids) - _out(base, ids)).abs().max() < TOL
    merged = peftfx.merge(pm)
    assert (_out(merged, ids) - ref).abs().max() < TOL
    assert (_out(peftfx.unmerge(merged), ids) - ref).abs().max() < TOL
    hm, ours = hf.merge_and_unload(), peftfx.merge_and_unload(pm)
    assert torch.allclose(ours.get_input_embeddings().weight, hm.get_input_embeddings().weight, atol=TOL)
    assert torch.allclose(ours.get_output_embeddings().weight, hm.get_output_embeddings().weight, atol=TOL)
    assert (_out(ours, ids) - ref).abs().max() < TOL
    # only the selected rows train
    pm.train()
    pm(input_ids=ids).logits.sum().backward()
    delta = pm.get_parameter(f"{embed}.trainable_tokens.token_delta")
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert all(".lora." in n or n.endswith("token_delta") for n, p in pm.named_parameters() if p.requires_grad)


def test_trainable_tokens_hf_folders_both_ways(tmp_path):
    from peft import LoraConfig, PeftModel

    ids = _token_ids()
    _, hf, _ = _pair("gpt2", LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                        trainable_token_indices=TOKENS), LoRA(rank=4), ids)
    hf.save_pretrained(str(tmp_path / "hf"))
    ref = _out(hf, ids)
    pm = peftfx.load_adapter(M.gpt2(), tmp_path / "hf", {"input_ids": ids}).eval()
    assert (_out(pm, ids) - ref).abs().max() < TOL
    peftfx.save_adapter(pm, tmp_path / "back", format="hf")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == TOKENS and config["task_type"] == "CAUSAL_LM"
    back = PeftModel.from_pretrained(M.gpt2(), str(tmp_path / "back")).eval()
    assert (_out(back, ids) - ref).abs().max() < TOL
    peftfx.save_adapter(pm, tmp_path / "fx")
    again = peftfx.load_adapter(M.gpt2(), tmp_path / "fx", {"input_ids": ids}).eval()
    assert (_out(again, ids) - ref).abs().max() < TOL


def test_trainable_tokens_bad_indices_are_errors():
    with pytest.raises(RuleError, match="token_indices"):
        TrainableTokens(token_indices=())
    with pytest.raises(RuleError, match="duplicates"):
        TrainableTokens(token_indices=(1, 1))
    with pytest.raises(peftfx.PeftfxError):
        peftfx.apply(M.llama(), TrainableTokens(token_indices=(500,)), {"input_ids": M.ids()})


def test_hf_trainable_tokens_config_folders_both_ways(tmp_path):
    """HF's standalone ``TrainableTokensConfig`` (peft_type TRAINABLE_TOKENS; a tied head's rows stored twice)."""
    from peft import PeftModel, TrainableTokensConfig, get_peft_model

    ids = _token_ids()
    hf = get_peft_model(M.gpt2(), TrainableTokensConfig(token_indices=TOKENS))
    _perturb(hf, torch.Generator().manual_seed(4))
    hf.eval().save_pretrained(str(tmp_path / "hf"))
    ref = _out(hf, ids)
    assert (ref - _out(M.gpt2(), ids)).abs().max() > 1e-2
    pm = peftfx.load_adapter(M.gpt2(), tmp_path / "hf", {"input_ids": ids}).eval()
    assert peftfx.trainable_parameters(pm)[0] == hf.get_nb_trainable_parameters()[0] == len(TOKENS) * 64
    assert (_out(pm, ids) - ref).abs().max() < TOL
    peftfx.save_adapter(pm, tmp_path / "back", format="hf")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == TOKENS
    back = PeftModel.from_pretrained(M.gpt2(), str(tmp_path / "back")).eval()
    assert (_out(back, ids) - ref).abs().max() < TOL
