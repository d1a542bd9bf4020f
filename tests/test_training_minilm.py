"""LoRA training on the real all-MiniLM-L6-v2 weights: loss falls clearly, base weights stay bit-identical."""
from __future__ import annotations

import random

import torch

import peftfx
from peftfx import LoRA, select
from tests import models as M

ANIMALS = ["the dog", "a cat", "the horse", "my parrot", "the old fox", "a small rabbit", "the cow", "an owl"]
ANIMAL_VERBS = ["sleeps in the barn", "chases its tail", "eats fresh grass", "hunts at night", "barks at strangers",
                "purrs on the sofa", "builds a nest", "runs across the field"]
TECH = ["the compiler", "a database", "the kernel", "my laptop", "the web server", "a python script",
        "the graphics card", "the router"]
TECH_VERBS = ["crashes on startup", "allocates more memory", "compiles the project", "drops network packets",
              "caches the query", "renders the frame", "parses the config file", "runs the unit tests"]


def _dataset(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        subj, verbs = (ANIMALS, ANIMAL_VERBS) if label == 0 else (TECH, TECH_VERBS)
        rows.append((f"{rng.choice(subj)} {rng.choice(verbs)}", label))
    rng.shuffle(rows)
    return rows


def test_lora_training_on_real_minilm_lowers_loss_and_keeps_base_bit_identical():
    model, tok = M.minilm(labels=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    train = _dataset(96, seed=1)
    enc = tok([t for t, _ in train[:8]], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    peft = peftfx.apply(model, LoRA(rank=8, alpha=16, dropout=0.05,
                                    targets=select.role("attn.q") | select.role("attn.v") | select.role("head")),
                        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    lossf = torch.nn.CrossEntropyLoss()

    def batch(rows):
        e = tok([t for t, _ in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
        return e["input_ids"], e["attention_mask"], torch.tensor([y for _, y in rows])

    def eval_loss():
        peft.eval()
        with torch.no_grad():
            ids, mask, y = batch(train)
            return lossf(peft(input_ids=ids, attention_mask=mask).logits, y).item()

    before = eval_loss()
    peft.train()
    steps = 0
    for epoch in range(25):
        for i in range(0, len(train), 8):
            ids, mask, y = batch(train[i: i + 8])
            loss = lossf(peft(input_ids=ids, attention_mask=mask).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    after = eval_loss()
    assert steps == 300
    assert after < 0.1 and after < before / 5, (before, after)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), f"base weight {k} changed"
    # held-out sentences are classified well (the model learnt the task, not the batch)
    test = _dataset(40, seed=99)
    ids, mask, y = batch(test)
    peft.eval()
    with torch.no_grad():
        acc = (peft(input_ids=ids, attention_mask=mask).logits.argmax(-1) == y).float().mean().item()
    assert acc >= 0.9
