"""Hugging Face ``Trainer`` writes adapter-only checkpoints of a peftfx model and resumes from them
(:func:`peftfx.integrations.hf_trainer.adapter_checkpoints`); TRL's ``SFTTrainer`` trains a peftfx model with the
losses of the same run on HF PEFT. Tiny Llama (hidden 32, 2 layers), offline."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import peftfx
from peftfx import LoRA, select
from peftfx.integrations.hf_trainer import adapter_checkpoints
from tests import models as M

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

TOL = 1e-4
RULE = LoRA(rank=4, alpha=8, targets=select.role("attn.q", "attn.v"))


def _base():
    return M.llama(layers=2, hidden=32, inter=64, heads=4, kv_heads=2, vocab=64, seed=0)


def _rows(n=16, seq=8):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 64, (n, seq), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def _args(out, steps, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, use_cpu=True, report_to=[],
                             logging_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
                             remove_unused_columns=False, **kw)


def _lora(pm):
    return {k: v.detach().clone() for k, v in pm.state_dict().items() if ".lora." in k}


def _apply(base, rows):
    pm = peftfx.apply(copy.deepcopy(base), RULE, {"input_ids": torch.stack([r["input_ids"] for r in rows[:2]]),
                                                 "labels": torch.stack([r["labels"] for r in rows[:2]])})
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def test_trainer_writes_adapter_only_checkpoints_and_resumes_exactly(tmp_path):
    from transformers import Trainer

    base, rows = _base(), _rows()
    # uninterrupted: 4 steps, a checkpoint every 2
    full = _apply(base, rows)
    adapter_checkpoints(Trainer(model=full, args=_args(tmp_path / "run", 4, save_strategy="steps", save_steps=2),
                                train_dataset=rows)).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    size = (ckpt / "adapter_model.safetensors").stat().st_size
    base_size = sum(p.numel() * 4 for p in base.parameters())
    assert size < 20_000 < base_size                     # the adapter: kB; the base would be ~0.1 MB+ here
    # a fresh model (as in a new process) resumes from step 2 and must end where the uninterrupted run ended
    again = _apply(base, rows)                           # same start; the checkpoint must overwrite the adapter
    with torch.no_grad():
        for n, p in again.named_parameters():
            if ".lora." in n:
                p.zero_()
    t2 = adapter_checkpoints(Trainer(model=again, args=_args(tmp_path / "resumed", 4, save_strategy="no"),
                                     train_dataset=rows))
    t2.train(resume_from_checkpoint=str(ckpt))
    a, b = _lora(full), _lora(again)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((a[k] - _lora(_apply(base, rows))[k]).abs().max().item() for k in a) > 1e-3   # it trained
    t2.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "final" / "model.safetensors").exists()
    # the saved folder loads with peftfx and with HF PEFT, both giving the trained model's outputs
    from peft import PeftModel as HFPeftModel

    ids = torch.stack([r["input_ids"] for r in rows[:3]])
    with torch.no_grad():
        want = again.eval()(input_ids=ids).logits
        ours = peftfx.load_adapter(copy.deepcopy(base), str(tmp_path / "final"), {"input_ids": ids}).eval()
        hf = HFPeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "final")).eval()
        assert (ours(input_ids=ids).logits - want).abs().max().item() <= 1e-5
        assert (hf(input_ids=ids).logits - want).abs().max().item() <= 1e-5
        assert (want - base.eval()(input_ids=ids).logits).abs().max().item() > 1e-3     # the adapter matters


def test_trainer_loads_the_best_adapter_at_end(tmp_path):
    """``load_best_model_at_end=True``: the model ends with the adapter of ``state.best_model_checkpoint`` (the stock
    ``_load_best_model`` would look for the full model's weights there and fail)."""
    from transformers import Trainer

    from peftfx.io.hf import read_hf_folder

    base, rows = _base(), _rows()
    pm = _apply(base, rows)
    trainer = adapter_checkpoints(Trainer(
        model=pm, args=_args(tmp_path / "run", 3, save_strategy="steps", save_steps=1, eval_strategy="steps",
                             eval_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                             greater_is_better=True, per_device_eval_batch_size=4),      # the *worst* loss: not the last
        train_dataset=rows, eval_dataset=rows[:4]))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")
    _, tensors = read_hf_folder(best)
    for k, v in _lora(pm).items():
        site, which = k.rsplit(".lora.", 1)
        assert torch.equal(tensors[f"base_model.model.{site}.{which}.weight"], v)


def test_trainer_without_the_call_checkpoints_the_whole_model(tmp_path):
    """transformers 5.25 decides by class (``isinstance(model, (PreTrainedModel, peft.PeftModel))`` in
    ``Trainer._save``): a peftfx model handed to ``Trainer`` alone is saved as its full state dict. If this fails,
    transformers started asking the model (duck typing) and ``adapter_checkpoints`` may become unnecessary."""
    from transformers import Trainer

    base, rows = _base(), _rows()
    pm = _apply(base, rows)
    trainer = Trainer(model=pm, args=_args(tmp_path / "run", 1, save_strategy="no"), train_dataset=rows)
    trainer.save_model(str(tmp_path / "out"))
    files = set(os.listdir(tmp_path / "out"))
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(pm.state_dict())          # every base weight, not the adapter alone


def test_save_pretrained_follows_hugging_face_conventions(tmp_path):
    """``peft.save_pretrained(dir)`` adds the adapter files to ``dir`` and keeps the rest (a Trainer output folder);
    ``is_main_process=False`` writes nothing; a ``state_dict`` (gathered from a sharded model) supplies the values;
    pickle and unknown keywords are refused, the folder unchanged."""
    from peftfx.io.hf import read_hf_folder

    base, rows = _base(), _rows()
    pm = _apply(base, rows)
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "tokenizer.json").write_text("{}")
    pm.save_pretrained(out)
    assert {"checkpoint-2", "tokenizer.json", "adapter_model.safetensors", "adapter_config.json"} == set(
        os.listdir(out))
    pm.save_pretrained(out, format="peftfx")                     # the other format replaces the adapter files
    assert {"checkpoint-2", "tokenizer.json", "adapter.safetensors", "adapter_config.json"} == set(os.listdir(out))
    pm.save_pretrained(out)
    pm.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()
    state = pm.state_dict()
    key = next(k for k in state if k.endswith("q_proj.lora.lora_B"))
    state[key] = torch.full_like(state[key], 0.25)
    pm.save_pretrained(tmp_path / "sd", state_dict=state)
    _, tensors = read_hf_folder(tmp_path / "sd")
    site = key.rsplit(".lora.", 1)[0]
    assert torch.equal(tensors[f"base_model.model.{site}.lora_B.weight"], state[key])
    assert not torch.equal(pm.state_dict()[key], state[key])                        # the model is untouched
    before = sorted(os.listdir(out))
    with pytest.raises(peftfx.PeftfxError, match="safetensors only"):
        pm.save_pretrained(out, safe_serialization=False)
    with pytest.raises(peftfx.PeftfxError, match="unexpected keyword"):
        pm.save_pretrained(out, shard_everything=True)
    with pytest.raises(peftfx.PeftfxError, match="lacks adapter tensor"):
        pm.save_pretrained(out, state_dict={k: v for k, v in state.items() if k != key})
    assert sorted(os.listdir(out)) == before


def test_adapter_checkpoints_refuses_a_plain_model():
    from transformers import Trainer

    with pytest.raises(peftfx.PeftfxError, match="peftfx.apply"):
        adapter_checkpoints(Trainer(model=_base(), args=_args("/tmp/peftfx-unused", 1), train_dataset=_rows(4)))


# ------------------------------------------------------------------------------------------------ TRL
def _tokenizer():
    """A tiny offline tokenizer: a ``tokenizers`` WordLevel vocabulary, whitespace-split."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "blue"]
    tk = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}},
                                    unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                                        bos_token_id=None))


def _twins(base, tok, perturb=True):
    """(peftfx model, HF PEFT model) with the same LoRA weights (HF's, B perturbed unless ``perturb=False``,
    copied into peftfx)."""
    from peft import LoraConfig, get_peft_model

    enc = tok(["the cat sat on the mat", "a dog ran"], padding=True, return_tensors="pt")
    pm = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=select.name("q_proj", "v_proj")),
                      {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                       "labels": enc["input_ids"]})
    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(4)
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if ".lora.lora_" in n:
                site, which = n.rsplit(".lora.", 1)
                src = theirs[f"base_model.model.{site}.{which}.default.weight"]
                if which == "lora_B" and perturb:
                    src.copy_(torch.randn(src.shape, generator=g) * 0.2)
                p.copy_(src)
    return pm, hf


_TRL_ARGS = {"use_cpu": True, "report_to": [], "logging_steps": 1, "save_strategy": "no", "seed": 0,
             "disable_tqdm": True, "dataloader_num_workers": 0, "bf16": False, "gradient_checkpointing": False}


def _trl_logs(trainer_cls, config_cls, rows, out, trainer_kw, **config) -> list[dict]:
    """Train a TRL trainer on ``rows`` (CPU, seed 0, no saving, every step logged); the log entries with a loss."""
    from datasets import Dataset

    args = config_cls(output_dir=str(out), **_TRL_ARGS, **config)
    trainer = trainer_cls(args=args, train_dataset=Dataset.from_list(rows), **trainer_kw)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def _sft_losses(model, tok, out):
    from trl import SFTConfig, SFTTrainer

    rows = [{"text": t} for t in ["the cat sat on the mat", "a dog ran fast", "the red cat ran", "a blue dog sat slow"]]
    logs = _trl_logs(SFTTrainer, SFTConfig, rows, out, {"model": model, "processing_class": tok},
                     max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2)
    return [h["loss"] for h in logs]


def test_trl_sft_trainer_losses_equal_hf_peft(tmp_path):
    """TRL's SFTTrainer projects ``model.base_model``'s hidden states through the LM head (its fused head): on a
    peftfx model that backbone is the adapted graph's (peftfx.integrations.backbone)."""
    pytest.importorskip("trl")
    tok, base = _tokenizer(), _tiny_llama()
    pm, hf = _twins(base, tok)
    start = _lora(pm)
    ours, theirs = _sft_losses(pm, tok, tmp_path / "a"), _sft_losses(hf, tok, tmp_path / "b")
    assert len(ours) == len(theirs) == 3
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < TOL
    end, hf_state = _lora(pm), dict(hf.named_parameters())
    assert max((end[k] - start[k]).abs().max().item() for k in end) > 1e-3          # it trained
    for k, v in end.items():                                                        # to HF PEFT's weights
        site, which = k.rsplit(".lora.", 1)
        assert (v - hf_state[f"base_model.model.{site}.{which}.default.weight"]).abs().max().item() < TOL


def _dpo_losses(model, ref, tok, out, **cfg):
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in [
        ("the cat", "sat on the mat", "ran fast"), ("a dog", "ran fast", "sat slow"), ("the red cat", "sat", "ran"),
        ("a blue dog", "ran on the mat", "sat on a cat")]]
    logs = _trl_logs(DPOTrainer, DPOConfig, rows, out, {"model": model, "ref_model": ref, "processing_class": tok},
                     max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, **cfg)
    return [h["loss"] for h in logs]


@pytest.mark.filterwarnings("ignore")
def test_trl_dpo_trainer_with_disable_adapter_reference_equals_hf_peft(tmp_path):
    """DPO's reference is the base model: HF PEFT (``ref_model=None``; TRL freezes a copy of the untrained adapter,
    B = 0, i.e. the base) against peftfx's ``reference_model`` (the same model under ``disable_adapter()``). The
    first loss is log 2 (policy = reference), later ones move, all equal within 1e-4."""
    pytest.importorskip("trl")
    from peftfx.integrations.trl import reference_model

    tok, base = _tokenizer(), _tiny_llama()
    pm, hf = _twins(base, tok, perturb=False)
    ours = _dpo_losses(pm, reference_model(pm), tok, tmp_path / "a")
    theirs = _dpo_losses(hf, None, tok, tmp_path / "b")
    assert len(ours) == len(theirs) == 3
    assert abs(ours[0] - 0.6931472) < 1e-5 and abs(ours[-1] - ours[0]) > 1e-4
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < TOL


def test_base_model_is_the_adapted_backbone():
    """``peft.base_model(**batch).last_hidden_state`` projected through the LM head gives the adapted model's logits
    (not the base's); inside disable_adapter() the base's; an adapter on the head itself is refused."""
    base, rows = _base(), _rows()
    pm = _apply(base, rows).eval()
    ids = torch.stack([r["input_ids"] for r in rows[:3]])
    with torch.no_grad():
        logits = pm(input_ids=ids).logits
        hidden = pm.base_model(input_ids=ids).last_hidden_state
        assert (hidden @ pm.get_output_embeddings().weight.T - logits).abs().max() < 1e-5
        with pm.disable_adapter():
            ref = pm.base_model(input_ids=ids).last_hidden_state @ base.lm_head.weight.T
        assert (ref - base(input_ids=ids).logits).abs().max() < 1e-5 and (ref - logits).abs().max() > 1e-3
    head = peftfx.apply(_base(), LoRA(rank=2, targets=select.name("lm_head")), {"input_ids": ids})
    with pytest.raises(peftfx.PeftfxError, match="output head carries an adapter"):
        head.base_model(input_ids=ids)


def _kto_losses(model, ref, tok, out, **cfg):
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": p, "completion": c, "label": lab} for p, c, lab in [
        ("the cat", "sat on the mat", True), ("a dog", "sat slow", False), ("the red cat", "sat", True),
        ("a blue dog", "sat on a cat", False)]]
    logs = _trl_logs(KTOTrainer, KTOConfig, rows, out, {"model": model, "ref_model": ref, "processing_class": tok},
                     max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, **cfg)
    return [h["loss"] for h in logs]


@pytest.mark.filterwarnings("ignore")
def test_trl_kto_trainer_with_disable_adapter_reference_equals_hf_peft(tmp_path):
    """KTO (TRL 1.16, with its KL term from mismatched completions): reference = the base model, as for DPO. The
    LoRA starts at B = 0, so HF PEFT's reference (TRL's frozen "ref" copy of the starting adapter) is the base too."""
    pytest.importorskip("trl")
    from peftfx.integrations.trl import reference_model

    tok, base = _tokenizer(), _tiny_llama()
    pm, hf = _twins(base, tok, perturb=False)
    start = _lora(pm)
    ours = _kto_losses(pm, reference_model(pm), tok, tmp_path / "a")
    theirs = _kto_losses(hf, None, tok, tmp_path / "b")
    assert len(ours) == len(theirs) == 3
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < TOL
    assert abs(ours[-1] - ours[0]) > 1e-4                                          # the loss moved
    end = _lora(pm)
    assert max((end[k] - start[k]).abs().max().item() for k in end) > 1e-3          # it trained


def _grpo_run(model, tok, out):
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **_):           # a reward with spread inside each group: how often "cat" appears
        return [float(c.split().count("cat")) + 0.1 * len(c.split()) for c in completions]

    rows = [{"prompt": p} for p in ["the cat", "a dog", "the red cat", "a blue dog"]]
    logs = _trl_logs(GRPOTrainer, GRPOConfig, rows, out,
                     {"model": model, "reward_funcs": reward, "processing_class": tok}, max_steps=3,
                     per_device_train_batch_size=4, num_generations=4, max_completion_length=5, learning_rate=5e-2)
    return [h["loss"] for h in logs], [h["reward"] for h in logs]


@pytest.mark.filterwarnings("ignore")
def test_trl_grpo_trainer_equals_hf_peft(tmp_path):
    """GRPO (TRL 1.16, its default beta = 0: no reference model) with a tiny reward function and the model's own
    ``generate`` (sampling; no vLLM): completions are sampled by peftfx's adapted graphs (peftfx.dropin.generate), so
    rewards, losses and the final LoRA weights equal HF PEFT's run from the same weights and seed."""
    pytest.importorskip("trl")
    tok, base = _tokenizer(), _tiny_llama()
    pm, hf = _twins(base, tok)
    start = _lora(pm)
    ours, theirs = _grpo_run(pm, tok, tmp_path / "a"), _grpo_run(hf, tok, tmp_path / "b")
    assert len(ours[0]) == len(theirs[0]) == 3
    assert ours[1] == pytest.approx(theirs[1], abs=1e-6)                       # same completions sampled
    assert max(abs(a - b) for a, b in zip(ours[0], theirs[0])) < TOL
    end, hf_state = _lora(pm), dict(hf.named_parameters())
    assert max((end[k] - start[k]).abs().max().item() for k in end) > 1e-4          # it trained
    for k, v in end.items():
        site, which = k.rsplit(".lora.", 1)
        assert (v - hf_state[f"base_model.model.{site}.{which}.default.weight"]).abs().max().item() < TOL


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("trainer", ["dpo", "kto"])
def test_trl_precomputed_reference_needs_no_ref_model(tmp_path, trainer):
    """``ref_model=None`` with ``precompute_ref_log_probs=True``: TRL then needs no reference model for any model —
    it scores the dataset once with the model as it starts. That is HF PEFT's reference (TRL's frozen copy of the
    starting adapter) even for an adapter that does not start as the identity (B ≠ 0 here, where the base-model
    reference of ``reference_model`` would differ): losses equal HF PEFT's default run (``ref_model=None``)."""
    pytest.importorskip("trl")
    tok, base = _tokenizer(), _tiny_llama()
    pm, hf = _twins(base, tok, perturb=True)
    run = _dpo_losses if trainer == "dpo" else _kto_losses
    ours = run(pm, None, tok, tmp_path / "a", precompute_ref_log_probs=True)
    theirs = run(hf, None, tok, tmp_path / "b")
    assert len(ours) == len(theirs) == 3
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < TOL
    assert abs(ours[-1] - ours[0]) > 1e-4
