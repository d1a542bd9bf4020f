"""The model apply() returns is a drop-in for the user's module (issue 9): eval is really eval (one graph per mode),
any call signature (one graph per signature, traced once), and the rest of the module's face."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftfx
from peftfx import LoRA, select

from . import models as M


def _randomize_adapters(peft, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------ eval is eval
def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


@pytest.mark.parametrize("start", ["train", "eval"])
def test_batchnorm_eval_is_eval_and_train_updates_stats_like_the_original(start):
    model = _bn_model().train(start == "train")
    ref = copy.deepcopy(model)
    x = torch.randn(6, 4)
    with torch.no_grad():                                  # non-trivial running statistics to start from
        model.train()(torch.randn(16, 4) * 3 + 1)
    ref.load_state_dict(model.state_dict())
    model.train(start == "train")
    peft = peftfx.apply(model, LoRA(rank=2, targets=select.all()), x)   # LoRA B = 0: the base function
    bn, ref_bn = model[1], ref[1]

    peft.eval(), ref.eval()
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    out, want = peft(x), ref(x)
    assert (out - want).abs().max().item() <= 1e-6
    peft(x * 2)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])          # eval calls leave the statistics alone

    peft.train(), ref.train()
    for k in range(2):
        out, want = peft(x + k), ref(x + k)
        assert (out - want).abs().max().item() <= 1e-6
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-7)
    assert torch.allclose(bn.running_var, ref_bn.running_var, atol=1e-7)
    assert bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == stats[2].item() + 2
    assert dict(peft.named_buffers())["1.running_mean"] is bn.running_mean    # one set of buffers, shared

    peft.eval(), ref.eval()                              # back in eval: the updated statistics are used
    assert (peft(x) - ref(x)).abs().max().item() <= 1e-6
    assert peft.peft_variants.traces == 1               # one graph per mode; nothing traced twice


def test_batchnorm_eval_with_trained_adapter_matches_merged_weights():
    model = _bn_model().eval()
    x = torch.randn(5, 4)
    peft = peftfx.apply(model, LoRA(rank=2, targets=select.all()), x)
    _randomize_adapters(peft)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in (0, 2):
            mod = peft.get_submodule(f"{i}.lora")
            ref[i].weight += mod.delta()
    assert (peft(x) - ref(x)).abs().max().item() <= 1e-5


class _StochasticDepth(nn.Module):
    """x + drop_path(f(x)): in train each row's branch is kept with probability 1-p and rescaled; eval: x + f(x)."""

    def __init__(self, p=0.5):
        super().__init__()
        self.f, self.p = nn.Linear(8, 8), p

    def forward(self, x):
        y = self.f(x)
        if self.training:
            keep = (torch.rand(x.shape[0], 1) >= self.p).to(x.dtype) / (1 - self.p)
            y = y * keep
        return x + y


def test_stochastic_depth_takes_its_eval_side_in_eval_and_draws_like_the_original_in_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _StochasticDepth(), _StochasticDepth(), nn.Linear(8, 2)).train()
    x = torch.randn(8, 4)
    peft = peftfx.apply(model, LoRA(rank=2, targets=select.all()), x)
    peft.eval(), model.eval()
    assert (peft(x) - model(x)).abs().max().item() <= 1e-6
    peft.train(), model.train()
    torch.manual_seed(3)
    want = model(x)
    torch.manual_seed(3)
    assert (peft(x) - want).abs().max().item() <= 1e-6


def test_swin_drop_path_eval_equals_the_original():
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    model = SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                  num_heads=[2, 2], window_size=4, drop_path_rate=0.1,
                                                  num_labels=3))
    x = torch.randn(2, 3, 32, 32)
    peft = peftfx.apply(model, LoRA(rank=2), {"pixel_values": x})     # traced in train mode (drop_path on)
    peft.eval(), model.eval()
    with torch.no_grad():
        got, want = peft(pixel_values=x).logits, model(pixel_values=x).logits
    assert (got - want).abs().max().item() <= 1e-6


def test_dropout_masks_in_train_are_the_original_models_and_survive_an_eval_trace():
    model = M.gpt2().train()                      # dropout 0.1 in embeddings, attention and MLP
    ids = torch.randint(0, 128, (2, 12))
    peft = peftfx.apply(model, LoRA(rank=4), {"input_ids": ids})
    torch.manual_seed(7)
    want = model(input_ids=ids).logits
    torch.manual_seed(7)
    assert (peft(input_ids=ids).logits - want).abs().max().item() <= 1e-6
    peft.eval()
    peft(input_ids=ids)                           # traces the eval graph; must not consume the global RNG
    peft.train()
    torch.manual_seed(7)
    first = peft(input_ids=ids).logits
    peft.eval()
    peft(input_ids=ids[:, :5])
    peft.train()
    torch.manual_seed(7)
    assert torch.equal(peft(input_ids=ids).logits, first)
    assert (first - want).abs().max().item() <= 1e-6


def test_graphs_share_parameters_and_adapters_and_train_together():
    model = _bn_model().train()
    x = torch.randn(6, 4)
    peft = peftfx.apply(model, LoRA(rank=2, targets=select.all()), x)
    peft.eval()
    peft(x)
    variant = next(iter(peft.peft_variants.graphs.values()))
    mine = dict(peft.named_parameters())
    for name, p in variant.named_parameters():
        assert p is mine[name], name
    assert set(dict(variant.named_modules())) >= set(peft.peft_info.adapters)
    for name in peft.peft_info.adapters:
        assert variant.get_submodule(name) is peft.get_submodule(name)
    assert set(peft.state_dict()) == set(model.state_dict()) | {k for k in peft.state_dict() if ".lora." in k}


def test_a_pass_that_changes_the_graph_makes_other_graphs_stale():
    model = _bn_model().train()
    x = torch.randn(6, 4)
    peft = peftfx.apply(model, LoRA(rank=2, targets=select.all()), x)
    _randomize_adapters(peft)
    peft.eval()
    before = peft(x)
    merged = peftfx.merge(peft)                  # a fork: its own registry; merged adapters are not re-spliced
    merged.eval()
    assert (merged(x) - before).abs().max().item() <= 1e-5
    peftfx.add_adapter(peft, "two", LoRA(rank=2, targets=select.all()))   # splices into peft's graph
    assert (peft(x) - before).abs().max().item() <= 1e-6           # "two" is added inactive
    assert peft.peft_variants.traces == 2                           # the eval graph was rebuilt once


# ------------------------------------------------------------------------------------- any signature
def _hf_and_ours_llama():
    from tests.methods.test_lora import _hf_lora, _randomise_and_copy

    base = M.llama()
    ids = M.ids(batch=3, seq=10)
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=select.role("attn.q", "attn.v")),
                        {"input_ids": ids})
    hf = _hf_lora(copy.deepcopy(base), ["q_proj", "v_proj"])
    assert _randomise_and_copy(hf, ours) == 4
    return base, hf, ours


def _padded(side: str):
    ids = torch.randint(3, 128, (3, 9))
    mask = torch.ones_like(ids)
    for row, n in ((1, 3), (2, 5)):           # rows of different lengths
        if side == "left":
            mask[row, :n] = 0
        else:
            mask[row, -n:] = 0
    return ids, mask


def test_any_call_signature_matches_hf_peft_and_traces_each_signature_once():
    base, hf, ours = _hf_and_ours_llama()
    reg = ours.peft_variants
    with torch.no_grad():
        for side in ("left", "right"):
            ids, mask = _padded(side)
            want = hf(input_ids=ids, attention_mask=mask).logits
            got = ours(input_ids=ids, attention_mask=mask).logits
            assert (got - want).abs().max().item() <= 1e-5, side
            assert reg.traces == 1                  # one new signature (input_ids, attention_mask), traced once
        ids, mask = _padded("left")
        out = ours(input_ids=ids, attention_mask=mask, labels=ids)
        want = hf(input_ids=ids, attention_mask=mask, labels=ids)
        assert abs(out.loss.item() - want.loss.item()) <= 1e-5
        assert (out.logits - want.logits).abs().max().item() <= 1e-5
        assert ours(input_ids=ids).loss is None                       # no labels, no loss
        assert ours(ids, mask).logits.shape == (3, 9, 128)            # positionals bind by the model's signature
        tup = ours(input_ids=ids, return_dict=False)
        assert isinstance(tup, tuple) and (tup[0] - hf(input_ids=ids).logits).abs().max().item() <= 1e-5
        n = reg.traces
        for _ in range(2):
            ours(input_ids=ids[:2, :4], attention_mask=mask[:2, :4], labels=ids[:2, :4])
            ours(attention_mask=mask, input_ids=ids)
        assert reg.traces == n                                        # seen signatures: no new trace
        assert ours(input_ids=ids, attention_mask=None).logits.shape == (3, 9, 128)   # None = absent
        assert reg.traces == n
    with pytest.raises(TypeError, match="attention_msk"):
        ours(input_ids=ids, attention_msk=mask)


def test_bert_token_type_ids_and_labels_optional():
    from tests.methods.test_lora import _hf_lora, _randomise_and_copy

    base = M.bert()
    ids = torch.randint(3, 128, (3, 8))
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=select.role("attn.q", "attn.v")),
                        {"input_ids": ids})
    hf = _hf_lora(copy.deepcopy(base), ["query", "value"])
    _randomise_and_copy(hf, ours)
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        for kw in ({"token_type_ids": tt}, {"token_type_ids": tt, "attention_mask": mask},
                   {"attention_mask": mask, "labels": labels}):
            got, want = ours(input_ids=ids, **kw), hf(input_ids=ids, **kw)
            assert (got.logits - want.logits).abs().max().item() <= 1e-5, kw
            if "labels" in kw:
                assert abs(got.loss.item() - want.loss.item()) <= 1e-5
            else:
                assert got.loss is None


# ------------------------------------------------------------------------ the original module's face
def test_config_generation_config_device_dtype_come_from_the_base_model():
    model = M.llama()
    peft = peftfx.apply(model, LoRA(rank=2), {"input_ids": M.ids()})
    assert peft.config is model.config and peft.generation_config is model.generation_config
    assert peft.device == torch.device("cpu") and peft.dtype == torch.float32
    assert peft.main_input_name == "input_ids"
    with pytest.raises(AttributeError):
        peft.no_such_attribute
    import inspect
    assert "attention_mask" in inspect.signature(peft.forward).parameters   # Trainer keeps these columns


# ---------------------------------------------------------------------------------- disable_adapter
def _conformance_config(name):
    from tests.test_conformance import _config
    return _config(peftfx.METHODS[name])


@pytest.mark.parametrize("name", sorted(peftfx.METHODS))
def test_disable_adapter_gives_the_base_model_for_every_method(name):
    from tests.test_conformance import _base_model, _perturb

    base = _base_model()
    ref = copy.deepcopy(base)
    ids = M.ids(2, 5, vocab=64)
    peft = peftfx.apply(base, _conformance_config(name), {"input_ids": ids})
    _perturb(peft)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        for mode in (False, True):
            peft.train(mode), ref.train(mode)
            for kw in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
                torch.manual_seed(0)
                on = peft(**kw).logits
                with peftfx.disable_adapter(peft):
                    torch.manual_seed(0)
                    off = peft(**kw).logits
                torch.manual_seed(0)
                want = ref(**kw).logits
                assert (off - want).abs().max().item() <= 1e-6, (mode, list(kw))
                assert (on - want).abs().max().item() > 1e-4                  # the adapter is live
                with peft.disable_adapter():
                    pass
                torch.manual_seed(0)
                assert torch.equal(peft(**kw).logits, on)                    # exactly re-enabled
    merged = peftfx.merge(peft)
    if any(r.merged for r in merged.peft_info.adapters.values()):
        with pytest.raises(peftfx.PeftfxError, match="merged"):
            with peftfx.disable_adapter(merged):
                pass


# ------------------------------------------------------------------ merged model out, save_pretrained
def test_merge_and_unload_round_trips_through_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    base, hf, ours = _hf_and_ours_llama()
    ids, mask = _padded("left")
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask).logits
    merged = peftfx.merge_and_unload(ours)
    assert type(merged) is LlamaForCausalLM and merged.config.to_dict() == base.config.to_dict()
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
        hf_merged = hf.merge_and_unload()(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - hf_merged).abs().max().item() <= 1e-5
    with torch.no_grad():                                # ours and the original module are unchanged
        assert (ours(input_ids=ids, attention_mask=mask).logits - want).abs().max().item() == 0


def test_save_pretrained_writes_an_hf_peft_folder(tmp_path):
    from peft import PeftModel as HFPeftModel

    base, hf, ours = _hf_and_ours_llama()
    ids = M.ids(batch=3, seq=10)
    ours.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = HFPeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_merge_and_unload_refuses_adapters_that_do_not_merge():
    peft = peftfx.apply(M.llama(), peftfx.Houlsby(), {"input_ids": M.ids()})
    with pytest.raises(peftfx.PeftfxError, match="houlsby|adapter"):
        peftfx.merge_and_unload(peft)


# ------------------------------------------------------------------------------------------ generate
def test_generate_matches_hf_peft_greedy_sampling_and_beams_on_left_padded_prompts():
    base, hf, ours = _hf_and_ours_llama()
    hf.eval(), ours.eval()
    ids = torch.randint(3, 128, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0                                  # left padding, three prompt lengths
    common = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "pad_token_id": 0}
    for kw in ({"do_sample": False}, {"do_sample": True, "top_k": 10}, {"do_sample": False, "num_beams": 3}):
        torch.manual_seed(11)
        want = hf.generate(**common, **kw)
        torch.manual_seed(11)
        got = ours.generate(**common, **kw)
        assert torch.equal(got, want), kw
    assert ours.peft_variants.traces <= 2
    assert "forward" not in ours.peft_variants.source.__dict__      # the routing is undone


# ------------------------------------------------------------------ output_hidden_states / attentions
def test_output_hidden_states_equals_hf_peft_and_is_its_own_graph():
    base, hf, ours = _hf_and_ours_llama()
    ids, mask = _padded("left")
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert len(got.hidden_states) == len(want.hidden_states) == 3        # embeddings + 2 layers
        for a, b in zip(got.hidden_states, want.hidden_states):
            assert (a - b).abs().max().item() <= 1e-5
        assert (got.logits - want.logits).abs().max().item() <= 1e-5
        plain = ours(input_ids=ids, attention_mask=mask)                     # the switch is not left on
        assert getattr(plain, "hidden_states", None) is None
        n = ours.peft_variants.traces
        ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert ours.peft_variants.traces == n                                # seen before: no new trace
    assert base.config.output_hidden_states is False


def test_output_attentions_with_eager_attention_and_a_clear_error_with_sdpa():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    eager = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         attn_implementation="eager")).eval()
    ours = peftfx.apply(copy.deepcopy(eager), LoRA(rank=2), {"input_ids": M.ids(3, 10)}).eval()
    _randomize_adapters(ours)
    ref = peftfx.merge_and_unload(ours).eval()                  # the same function in plain transformers
    ids, mask = _padded("left")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == 2 and got.attentions[0].shape == (3, 4, 9, 9)
    for a, b in zip(got.attentions, want.attentions):
        assert (a - b).abs().max().item() <= 1e-5
    sdpa = peftfx.apply(M.llama(), LoRA(rank=2), {"input_ids": M.ids(3, 10)}).eval()
    with pytest.raises(peftfx.PeftfxError, match="output_attentions.*eager"):
        sdpa(input_ids=ids, output_attentions=True)
