"""Prompt tuning: parity with Hugging Face PEFT (same base, prompt copied across; HF returns N + S logits for a
causal LM, peftfx the S real-token logits, so HF's [:, N:] is compared), losses with labels, text init,
composition with LoRA and IA3 against a hand-merged reference, checkpoints, training, bad input."""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx import IA3, LoRA, PromptTuning, PTuning, select
from tests import models as M

TOL = 1e-5  # float32
N = 5


def _hf_prompt(model, task="CAUSAL_LM", **kw):
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(model, PromptTuningConfig(task_type=task, **{"num_virtual_tokens": N, **kw}))


def _inputs(batch=3, seq=10, pad_rows=1):
    ids = M.ids(batch, seq)
    mask = torch.ones_like(ids)
    mask[:pad_rows, :3] = 0                      # left padding in the first row(s)
    return {"input_ids": ids, "attention_mask": mask}


def _copy_prompt(hf, ours) -> torch.Tensor:
    (name,) = ours.peft_info.adapters if len(ours.peft_info.adapters) == 1 else \
        [n for n, r in ours.peft_info.adapters.items() if r.method == "prompt"]
    with torch.no_grad():
        ours.get_submodule(name).prompt_embeddings.copy_(hf.prompt_encoder.default.embedding.weight)
    return ours.get_submodule(name).prompt_embeddings


def _hf_trainable(hf) -> int:
    return sum(p.numel() for p in hf.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch,key", [("gpt2", "transformer.wte.prompt"), ("llama", "model.embed_tokens.prompt")])
def test_parity_with_hf_peft_causal_lm(arch, key):
    base = getattr(M, arch)()
    inputs = _inputs()
    ours = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=N), inputs)
    assert list(ours.peft_info.adapters) == [key]
    hf = _hf_prompt(copy.deepcopy(base))
    _copy_prompt(hf, ours)
    assert peftfx.trainable_parameters(ours)[0] == _hf_trainable(hf) == N * 64
    other = {"input_ids": M.ids(2, 7, seed=4), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        for x in (inputs, other):                          # a new batch and sequence length too
            a, b = hf(**x).logits, ours(**x).logits
            assert a.shape[1] == x["input_ids"].shape[1] + N and b.shape == base(**x).logits.shape
            assert (a[:, N:] - b).abs().max().item() < TOL
        assert (b - base(**other).logits).abs().max().item() > 1e-3       # the prompt really acts


def test_parity_with_hf_peft_encoder_decoder():
    """T5: the virtual tokens go before the encoder's tokens (the first token embedding in graph order); the
    decoder is unchanged. HF PEFT allocates 2N rows for seq2seq (num_transformer_submodules=2) but its
    prompt-tuning forward uses only the first N — peftfx allocates those N."""
    base = M.t5()
    x = dict(_inputs(2, 7), decoder_input_ids=M.ids(2, 5, seed=3))
    ours = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=N), x)
    assert list(ours.peft_info.adapters) == ["encoder.embed_tokens.prompt"]
    hf = _hf_prompt(copy.deepcopy(base), task="SEQ_2_SEQ_LM")
    assert _hf_trainable(hf) == 2 * peftfx.trainable_parameters(ours)[0]
    with torch.no_grad():
        ours.get_submodule("encoder.embed_tokens.prompt").prompt_embeddings.copy_(
            hf.prompt_encoder.default.embedding.weight[:N])
        a, b = hf(**x).logits, ours(**x).logits
    assert a.shape == b.shape == (2, 5, 128)
    assert (a - b).abs().max().item() < TOL


def test_loss_with_labels_matches_hf():
    """Labels get N leading -100s inside the graph, as HF PEFT does: the losses agree."""
    base = M.llama()
    inputs = _inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    ex = dict(inputs, labels=labels)
    ours = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=N), ex)
    hf = _hf_prompt(copy.deepcopy(base))
    _copy_prompt(hf, ours)
    with torch.no_grad():
        a, b = hf(**ex), ours(**ex)
    assert abs(a.loss.item() - b.loss.item()) < TOL
    assert (a.logits[:, N:] - b.logits).abs().max().item() < TOL


def test_parity_with_hf_peft_bert_classifier():
    """BERT: token_type_ids get N zeros; the classifier reads position 0 (the first virtual token) as in HF.
    HF PEFT also trains the classifier head for SEQ_CLS (modules_to_save, 64·2 + 2 = 130 parameters);
    peftfx trains only the prompt — that is the whole difference in the counts."""
    base = M.bert()
    inputs = dict(_inputs(), token_type_ids=torch.zeros(3, 10, dtype=torch.long))
    inputs["token_type_ids"][:, 6:] = 1
    ours = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=N), inputs)
    hf = _hf_prompt(copy.deepcopy(base), task="SEQ_CLS")
    _copy_prompt(hf, ours)
    assert peftfx.trainable_parameters(ours)[0] == N * 64 == _hf_trainable(hf) - (64 * 2 + 2)
    with torch.no_grad():
        a, b = hf(**inputs).logits, ours(**inputs).logits
    assert a.shape == b.shape == (3, 2)
    assert (a - b).abs().max().item() < TOL


def test_position_ids_input_extends_like_hf_default():
    """A traced position_ids input gets 0…N-1 in front and N is added to the given ones; with the default
    positions that is HF's arange(N + S) (HF PEFT drops user position ids for prompt tuning)."""
    base = M.llama()
    ids = M.ids(2, 9)
    pos = torch.arange(9).expand(2, 9)
    ours = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=N), {"input_ids": ids, "position_ids": pos})
    hf = _hf_prompt(copy.deepcopy(base))
    _copy_prompt(hf, ours)
    with torch.no_grad():
        assert (hf(input_ids=ids).logits[:, N:] - ours(input_ids=ids, position_ids=pos).logits).abs().max() < TOL


def test_text_init_matches_hf():
    base, tok = M.minilm()
    enc = tok(["a small test sentence", "graphs"], padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    text = "classify the sentiment"
    path = tok.name_or_path
    ours = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=8, init="text", init_text=text,
                                                          tokenizer=path), inputs)
    hf = _hf_prompt(copy.deepcopy(base), task="SEQ_CLS", prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                    tokenizer_name_or_path=path, num_virtual_tokens=8)
    P = ours.get_submodule("bert.embeddings.word_embeddings.prompt").prompt_embeddings
    assert torch.equal(P, hf.prompt_encoder.default.embedding.weight)          # same token ids, repeated to N
    ids = tok(text)["input_ids"]                                                # [CLS] … [SEP], 5 ids
    assert len(ids) < 8 and torch.equal(P[len(ids)], base.bert.embeddings.word_embeddings.weight[ids[0]])
    with torch.no_grad():
        assert (hf(**inputs).logits - ours(**inputs).logits).abs().max().item() < TOL


def test_with_lora_and_ia3_in_one_apply():
    """LoRA on attention q/v + IA3 on the MLP + prompt tuning; reference: the LoRA/IA3 updates merged by hand into
    a copy of the base weights, wrapped by HF PEFT prompt tuning with the same prompt."""
    base = M.llama()
    inputs = _inputs()
    rules = [LoRA(rank=4, alpha=8), IA3(targets=select.role("mlp.down")), PromptTuning(num_virtual_tokens=N)]
    ours = peftfx.apply(copy.deepcopy(base), rules, inputs)
    assert sorted(r.method for r in ours.peft_info.adapters.values()).count("lora") == 4
    ref = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, rec in ours.peft_info.adapters.items():
            mod = ours.get_submodule(name)
            if rec.method == "lora":
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.1)
                ref.get_parameter(rec.site["weight"]).add_(mod.delta())
            elif rec.method == "ia3":
                mod.ia3_l.copy_(1 + 0.3 * torch.randn(mod.ia3_l.shape, generator=g))
                mod.merge(ref.get_parameter(rec.site["weight"]), None)
    hf = _hf_prompt(ref)
    _copy_prompt(hf, ours)
    with torch.no_grad():
        assert (hf(**inputs).logits[:, N:] - ours(**inputs).logits).abs().max().item() < TOL
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.prompt.prompt_embeddings" in trainable and len(trainable) == 4 * 2 + 2 + 1


def test_checkpoint_round_trip_and_vocab_init(tmp_path):
    base = M.gpt2()
    inputs = _inputs()
    ours = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=N, init="vocab"), inputs)
    P = ours.get_submodule("transformer.wte.prompt").prompt_embeddings
    for row in P:                                                        # "vocab": rows of the token embedding
        assert (base.transformer.wte.weight - row).abs().sum(-1).min().item() == 0.0
    with torch.no_grad():
        P.mul_(0.5)
        ref = ours(**inputs).logits
    peftfx.save_adapter(ours, tmp_path / "a")
    back = peftfx.load_adapter(copy.deepcopy(base), tmp_path / "a", inputs)
    assert back.peft_info.rules[0] == ours.peft_info.rules[0]
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, ref)


def test_training_lowers_loss():
    """A frozen random GPT-2 learns to push every next-token prediction towards token 7 through the prompt alone."""
    ours = peftfx.apply(M.gpt2(), PromptTuning(num_virtual_tokens=4), {"input_ids": M.ids(4, 12),
                                                                      "labels": M.ids(4, 12)})
    ids = M.ids(4, 12)
    labels = torch.full_like(ids, 7)
    before, after = M.train_with_labels(ours, ids, labels)
    assert after < before - 0.15, (before, after)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "prompt" not in n)


def test_bad_input_is_clear_and_changes_nothing():
    from peftfx.apply import apply_to_graph

    vit = M.vit()
    with pytest.raises(peftfx.SiteError, match="token embedding") as e:
        peftfx.apply(vit, PromptTuning(num_virtual_tokens=N), {"pixel_values": torch.randn(2, 3, 32, 32)})
    assert "role 'embed'" in str(e.value)
    assert all(p.requires_grad for p in vit.parameters())                    # nothing was frozen
    ids = M.ids()
    pm = peftfx.trace(M.gpt2(), {"input_ids": ids, "labels": ids})
    code = pm.code
    with pytest.raises(peftfx.ConflictError, match="one of prompt tuning"):
        apply_to_graph(pm, peftfx.rules_from_data([PromptTuning(num_virtual_tokens=2), PTuning(num_virtual_tokens=2)]))
    assert pm.code == code and not pm.peft_info.adapters                    # raised before any change
    # labels aliased to input_ids in the example (one tensor, two names): trace keeps two inputs, so prompt
    # tuning widens the labels with -100s and the loss equals the one traced from separate tensors
    base = M.gpt2()
    aliased = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=2), {"input_ids": ids, "labels": ids})
    separate = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=2),
                            {"input_ids": ids, "labels": ids.clone()})
    separate.load_state_dict(aliased.state_dict())
    with torch.no_grad():
        assert torch.allclose(aliased(input_ids=ids, labels=ids).loss, separate(input_ids=ids, labels=ids).loss,
                              atol=1e-6)
    with pytest.raises(peftfx.SiteError, match="dynamic=True"):
        peftfx.apply(M.gpt2(), PromptTuning(num_virtual_tokens=2), {"input_ids": ids}, dynamic=False)
    with pytest.raises(peftfx.RuleError, match="num_virtual_tokens"):
        PromptTuning(num_virtual_tokens=0)
    with pytest.raises(peftfx.RuleError, match="init_text"):
        PromptTuning(init="text")
    assert peftfx.rules_from_data([PromptTuning(num_virtual_tokens=3, init="text", init_token_ids=(1, 2)).to_dict()]) \
        == [PromptTuning(num_virtual_tokens=3, init="text", init_token_ids=(1, 2))]


@pytest.mark.parametrize("cache", ["0", "1"])
def test_one_token_call_with_a_new_signature_equals_hf_peft(cache, monkeypatch):
    """A 1-token call with inputs the trace did not have (a new eval-mode graph is traced) gives HF PEFT's logits
    with the trace cache off as on: the new graph is traced with the sequence widened, so prompt tuning can widen
    it (traced at length 1 it was pinned and the call raised a SiteError when no cached graph served it)."""
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", cache)
    base = M.llama()
    inputs = _inputs()
    ours = peftfx.apply(copy.deepcopy(base), PromptTuning(num_virtual_tokens=N), inputs).eval()
    hf = _hf_prompt(copy.deepcopy(base)).eval()
    _copy_prompt(hf, ours)
    x = M.ids(3, 1, seed=6)
    with torch.no_grad():
        a, b = hf(input_ids=x, use_cache=False).logits, ours(input_ids=x, use_cache=False).logits
    assert b.shape == (3, 1, a.shape[-1]) and (a[:, N:] - b).abs().max().item() < TOL
