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


def test_adapter_checkpoints_refuses_a_plain_model():
    from transformers import Trainer

    with pytest.raises(peftfx.PeftfxError, match="peftfx.apply"):
        adapter_checkpoints(Trainer(model=_base(), args=_args("/tmp/peftfx-unused", 1), train_dataset=_rows(4)))
