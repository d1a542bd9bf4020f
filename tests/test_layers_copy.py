"""Activation checkpointing survives copies: ``copy.deepcopy``, ``peftfx.merge`` (a fork) and ``merge_and_unload``.

Checkpointing is shown by what it does, not by a flag: an adapter module inside a block runs twice per training
step (forward, then the recomputation in backward) when its block is checkpointed, once when it is not (forward
hooks count the calls); the bytes kept for backward (``tests.test_layers._step``) fall below 0.6× those without
checkpointing. Reference gradients: the same model with checkpointing off, same seed and dropout masks — equal
within 1e-6 (``tests.test_layers.TOL``)."""
from __future__ import annotations

import copy

import torch

import peftfx
from peftfx import Houlsby, LoRA
from peftfx.dropin import merge_and_unload
from peftfx.layers import LayerBlock
from tests import models as M
from tests.test_layers import TOL, _batch, _make, _step


def _calls(modules, run) -> int:
    """How many times ``modules`` start their forward during ``run()`` (recomputation included; non-reentrant
    checkpointing stops recomputing a block once it has every tensor backward needs, so a block's last module
    may not run again)."""
    count = [0]

    def hook(*_):
        count[0] += 1

    hooks = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return count[0]


def _block_adapters(pm, method: str | None = None) -> list:
    """The unmerged adapter modules inside ``pm``'s blocks (of ``method`` when given)."""
    return [pm.get_submodule(name) for name, rec in pm.peft_info.adapters.items()
            if name.startswith("model.layers.") and not rec.merged and method in (None, rec.method)]


def _train_step(pm, batch):
    def run():
        torch.manual_seed(7)
        pm(**batch).loss.backward()
    pm.zero_grad(set_to_none=True)
    return _calls(_block_adapters(pm), run)


def _same_grads(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_deepcopy_keeps_checkpointing_with_its_own_setting():
    pm = _make("llama", "lora")
    batch = _batch("llama")
    _, g_ref, kept_ref = _step(pm, batch)                                # no checkpointing
    once = _train_step(pm, batch)
    assert once == len(_block_adapters(pm)) > 0
    peftfx.gradient_checkpointing(pm)
    again = _train_step(pm, batch)
    assert again > once                                                  # the blocks are recomputed in backward
    twin = copy.deepcopy(pm)
    assert twin.is_gradient_checkpointing
    assert _train_step(twin, batch) == again
    _, g_twin, kept_twin = _step(twin, batch)
    assert set(g_twin) == set(g_ref) and _same_grads(g_ref, g_twin) <= TOL
    assert kept_twin < 0.6 * kept_ref, (kept_ref, kept_twin)
    assert any(isinstance(m, LayerBlock) for m in twin.modules())
    assert not any(m in set(pm.modules()) for m in twin.modules() if isinstance(m, LayerBlock))
    # own settings: off on the copy leaves the original on
    twin.gradient_checkpointing_disable()
    assert not twin.is_gradient_checkpointing and pm.is_gradient_checkpointing
    assert _train_step(twin, batch) == once and _train_step(pm, batch) == again
    # a model without checkpointing copies without it
    pm.gradient_checkpointing_disable()
    assert not copy.deepcopy(pm).is_gradient_checkpointing


def test_deepcopy_checkpoints_other_call_signatures():
    ids = M.ids(batch=2, seq=12)
    pm = _make("llama", "lora", example={"input_ids": ids})
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    once = _train_step(pm, batch)
    pm.gradient_checkpointing_enable()
    again = _train_step(pm, batch)
    assert again > once
    twin = copy.deepcopy(pm)
    assert _train_step(twin, batch) == again                             # a train-mode variant graph of the copy
    assert twin.peft_variants.graphs


def test_merge_keeps_checkpointing_and_trains_further():
    """A merged model (LoRA folded in, Houlsby kept) trained further checkpoints as the model it came from."""
    model = M.llama()
    batch = _batch("llama")
    pm = peftfx.apply(model, [LoRA(rank=4, alpha=8, targets=peftfx.select.role("attn.*")),
                              Houlsby(bottleneck=8, dropout=0.1)], batch).train()
    peftfx.gradient_checkpointing(pm)
    merged = peftfx.merge(pm)
    assert {r.method for r in merged.peft_info.adapters.values() if not r.merged} == {"adapter"}
    assert merged.is_gradient_checkpointing and pm.is_gradient_checkpointing
    houlsby = _block_adapters(merged, "adapter")
    assert houlsby and _block_adapters(merged) == houlsby             # LoRA merged: only Houlsby runs as a module
    for name, rec in merged.peft_info.adapters.items():                  # merged LoRA keeps its (unused) parameters
        if rec.merged:
            merged.get_submodule(name).requires_grad_(False)
    _, g_ckpt, kept_ckpt = _step(merged, batch)
    n_ckpt = _calls(houlsby, lambda: (torch.manual_seed(7), merged(**batch).loss.backward()))
    peftfx.gradient_checkpointing(merged, False)                         # reference: the merged model, no checkpointing
    assert pm.is_gradient_checkpointing                                  # the original keeps its own setting
    _, g_ref, kept_ref = _step(merged, batch)
    n_ref = _calls(houlsby, lambda: (torch.manual_seed(7), merged(**batch).loss.backward()))
    assert n_ckpt > n_ref > 0
    assert g_ref and set(g_ref) == set(g_ckpt) and _same_grads(g_ref, g_ckpt) <= TOL
    assert max(g.abs().max().item() for g in g_ref.values()) > 0
    assert kept_ckpt < 0.6 * kept_ref, (kept_ref, kept_ckpt)
    # without checkpointing on the source, the merge has none
    pm.gradient_checkpointing_disable()
    assert not peftfx.merge(pm).is_gradient_checkpointing


def test_merge_and_unload_turns_the_original_class_checkpointing_on():
    pm = _make("llama", "lora")
    batch = _batch("llama")
    plain = merge_and_unload(pm)
    assert not plain.is_activation_checkpointing
    pm.gradient_checkpointing_enable()
    out = merge_and_unload(pm)
    assert out.is_activation_checkpointing
    assert type(out) is type(plain)

    def step(m):
        m.train().zero_grad(set_to_none=True)
        n = _calls([m.model.layers[0].mlp], lambda: (torch.manual_seed(7), m(**batch).loss.backward()))
        return n, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    n_plain, g_plain = step(plain)
    n_out, g_out = step(out)
    assert n_plain == 1 and n_out == 2                                   # layer 0's MLP recomputed in backward
    assert set(g_plain) == set(g_out) and _same_grads(g_plain, g_out) <= TOL
