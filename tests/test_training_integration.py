"""The module from apply() trains unchanged under a plain PyTorch loop, the Hugging Face Trainer and
PyTorch Lightning; each run ends with the same LoRA weights as its reference (HF PEFT trained the same way,
or a plain loop from the same start), and the base stays bit-identical."""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx import LoRA, select
from tests import models as M

RULE = LoRA(rank=4, alpha=8, targets=select.role("attn.q") | select.role("attn.v"))
TOL = 2e-5


def _batches(n=4, bs=4, seq=10):
    return [{"input_ids": (ids := M.ids(batch=bs, seq=seq, seed=10 + i)), "labels": ids} for i in range(n)]


def _hf_twin(base, pm):
    """HF PEFT LoRA on the same base with the same A/B as ``pm``."""
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        lora_dropout=0.0))
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                ad = pm.get_submodule(name.replace("base_model.model.", "") + ".lora")
                ad.lora_B.normal_(std=0.05)
                mod.lora_A["default"].weight.copy_(ad.lora_A)
                mod.lora_B["default"].weight.copy_(ad.lora_B)
    return hf


def _lora_state(pm):
    return {k: v.detach().clone() for k, v in pm.state_dict().items() if ".lora." in k}


def _hf_lora_state(hf):
    out = {}
    for name, mod in hf.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            key = name.replace("base_model.model.", "") + ".lora"
            out[f"{key}.lora_A"] = mod.lora_A["default"].weight.detach().clone()
            out[f"{key}.lora_B"] = mod.lora_B["default"].weight.detach().clone()
    return out


def _max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _plain_loop(model, batches, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for b in batches:
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_plain_pytorch_loop_matches_hf_peft_trained_the_same_way():
    base = M.llama()
    batches = _batches()
    pm = peftfx.apply(copy.deepcopy(base), RULE, batches[0])
    hf = _hf_twin(base, pm)
    frozen = {k: v.clone() for k, v in pm.state_dict().items() if ".lora." not in k}
    ours, theirs = _plain_loop(pm, batches), _plain_loop(hf, batches)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < TOL
    assert _max_diff(_lora_state(pm), _hf_lora_state(hf)) < TOL
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in frozen.items())


def _trainer_run(model, batches, out_dir):
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in batches for i in range(len(b["input_ids"]))]
    args = TrainingArguments(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    return trainer.train()


def test_hf_trainer_trains_the_peftfx_module_like_hf_peft(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    base = M.llama()
    batches = _batches()
    pm = peftfx.apply(copy.deepcopy(base), RULE, batches[0])
    hf = _hf_twin(base, pm)
    frozen = {k: v.clone() for k, v in pm.state_dict().items() if ".lora." not in k}
    r1 = _trainer_run(pm, batches, tmp_path / "a")
    r2 = _trainer_run(hf, batches, tmp_path / "b")
    assert r1.global_step == r2.global_step == 4
    assert abs(r1.training_loss - r2.training_loss) < TOL
    assert _max_diff(_lora_state(pm), _hf_lora_state(hf)) < TOL
    assert _max_diff(_lora_state(pm), _lora_state(peftfx.apply(copy.deepcopy(base), RULE, batches[0]))) > 1e-3
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in frozen.items())


def test_lightning_callback_applies_rules_at_fit_start(tmp_path):
    L = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed")
    from peftfx.integrations.lightning import PeftfxCallback

    base = M.llama()
    batches = _batches()

    class LitLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = copy.deepcopy(base)
            self.start = None

        def on_fit_start(self):           # the rules are in place before the first step
            assert isinstance(self.model, peftfx.PeftModel)
            self.start = _lora_state(self.model)

        def training_step(self, batch, i):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    lit = LitLM()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[PeftfxCallback(RULE, batches[0], save_to=str(tmp_path / "adapter"))])
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    # reference: a plain loop from the same starting adapter on the same batches
    ref = peftfx.apply(copy.deepcopy(base), RULE, batches[0])
    ref.load_state_dict(lit.start, strict=False)
    _plain_loop(ref, batches)
    assert _max_diff(_lora_state(lit.model), _lora_state(ref)) < TOL
    assert _max_diff(_lora_state(lit.model), lit.start) > 1e-3
    for k, v in base.state_dict().items():
        assert torch.equal(v, lit.model.state_dict()[k])
    loaded = peftfx.load_adapter(copy.deepcopy(base), tmp_path / "adapter", batches[0])
    assert _max_diff(_lora_state(loaded), _lora_state(lit.model)) == 0
