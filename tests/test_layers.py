"""The layered view (``peftfx.layers``): one submodule per repeated block, activation checkpointing, FSDP2 per block.

Reference for checkpointing: the same model without checkpointing, same seed, train mode with dropout on (graph
dropout, attention dropout, adapter dropout) — losses and every adapter gradient equal within 1e-6 (they come out
bit-identical). Memory: the bytes autograd keeps for backward, counted with ``saved_tensors_hooks`` (unique
storages, parameters excluded) plus the block inputs checkpointing keeps alive — a deterministic count, not a time.
FSDP2: two gloo processes on CPU, ``fully_shard`` per block and at the root; adapter weights after N steps equal one
process training on both ranks' data within 1e-6."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import peftfx
from peftfx import Houlsby, LoRA, PeftfxError
from peftfx.layers import LayerBlock, blocks, partition
from tests import models as M
from tests.test_ddp import STEPS, _data, _free_port, _setup, _sgd

TOL = 1e-6


def _llama():
    m = M.llama()
    m.config.attention_dropout = 0.1                  # SDPA dropout in train mode
    return m


def _bert():
    return M.bert()                                   # hidden and attention-probability dropout 0.1


def _batch(name):
    ids = M.ids(batch=2, seq=12)
    if name == "llama":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.tensor([0, 1])}


def _rule(method):
    if method == "lora":
        return LoRA(rank=4, alpha=8, dropout=0.1, targets=peftfx.select.role("attn.*", "mlp.*"))
    return Houlsby(bottleneck=8, dropout=0.1)


def _make(name, method, example=None):
    model = _llama() if name == "llama" else _bert()
    pm = peftfx.apply(model, _rule(method), example or _batch(name))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():                             # non-zero B / up-projections: every adapter gradient is live
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm.train()


def _step(pm, batch, seed=7):
    """Loss, adapter gradients and the bytes kept for backward of one training step."""
    pm.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in pm.parameters()}
    kept: dict[int, int] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                kept[ptr] = t.untyped_storage().nbytes()

    def pack(t):
        keep(t)
        return t

    def block_inputs(module, args):                   # what non-reentrant checkpointing keeps: the block's inputs
        if module.__dict__["_peftfx_settings"].checkpoint:
            for a in args:
                keep(a)

    hooks = [m.register_forward_pre_hook(block_inputs) for m in pm.modules() if isinstance(m, LayerBlock)]
    torch.manual_seed(seed)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pm(**batch).loss
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("name,method", [("llama", "lora"), ("llama", "houlsby"), ("bert", "lora"),
                                         ("bert", "houlsby")])
def test_checkpointing_exact_gradients_less_memory(name, method):
    pm = _make(name, method)
    batch = _batch(name)
    loss0, g0, kept0 = _step(pm, batch)
    paths = peftfx.gradient_checkpointing(pm)
    assert paths == [f"{'model.layers' if name == 'llama' else 'bert.encoder.layer'}.{i}" for i in range(2)]
    assert all(isinstance(pm.get_submodule(p), LayerBlock) for p in paths)
    loss1, g1, kept1 = _step(pm, batch)
    assert g0 and set(g0) == set(g1)
    assert abs(loss0 - loss1).item() <= TOL
    assert max((g0[k] - g1[k]).abs().max().item() for k in g0) <= TOL
    assert max(g.abs().max().item() for g in g0.values()) > 1e-4        # gradients are live
    _, g_other, _ = _step(pm, batch, seed=8)                             # dropout is on: another seed differs
    assert max((g0[k] - g_other[k]).abs().max().item() for k in g0) > 1e-4
    assert kept1 < 0.6 * kept0, (kept0, kept1)
    # off again: the flat graph, the same gradients, all activations kept
    peftfx.gradient_checkpointing(pm, False)
    _, g2, kept2 = _step(pm, batch)
    assert kept2 == kept0 and max((g0[k] - g2[k]).abs().max().item() for k in g0) <= TOL


def test_layered_view_same_outputs_state_and_passes():
    pm = _make("llama", "lora")
    batch = _batch("llama")
    keys = list(pm.state_dict())
    pm.eval()
    with torch.no_grad():
        ref = pm(**batch).logits
    assert blocks(pm) == ["model.layers.0", "model.layers.1"]
    pm.gradient_checkpointing_enable()
    assert pm.is_gradient_checkpointing
    assert list(pm.state_dict()) == keys                                 # names unchanged
    with torch.no_grad():
        assert torch.equal(pm(**batch).logits, ref)                      # eval: layered, not checkpointed
    view = pm.__dict__["_peftfx_layers_view"]
    calls = [n.target for n in view.graph.nodes if n.op == "call_module"]
    assert calls == ["model.layers.0", "model.layers.1"]
    # every parameter a block's code reads is registered in that block (what fully_shard(block) manages)
    part = partition(pm)
    for n in pm.graph.nodes:
        if n.op == "get_attr" and str(n.target).startswith("model.layers."):
            assert part.owner[n] == ".".join(str(n.target).split(".")[:3]), n.target
    # passes still act on the flat graph: merge gives the same outputs, and the model keeps working after it
    merged = peftfx.merge(pm)
    with torch.no_grad():
        assert (merged(**batch).logits - ref).abs().max().item() < 1e-5
    pm.train()
    pm.gradient_checkpointing_disable()
    assert not pm.is_gradient_checkpointing
    with pytest.raises(PeftfxError, match="use_reentrant"):
        pm.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(PeftfxError, match="every_n_layers"):
        pm.activation_checkpointing_enable(every_n_layers=2)
    assert not pm.is_activation_checkpointing
    pm.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False)
    assert pm.is_activation_checkpointing and pm.is_gradient_checkpointing     # the Trainer's call (transformers 5.25)


def test_checkpointing_reaches_other_signatures():
    """A model applied with input_ids only, trained with labels and attention_mask (a train-mode variant)."""
    ids = M.ids(batch=2, seq=12)
    pm = _make("llama", "lora", example={"input_ids": ids})
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss0, g0, kept0 = _step(pm, batch)
    pm.gradient_checkpointing_enable()
    loss1, g1, kept1 = _step(pm, batch)
    assert pm.peft_variants.graphs                                       # it ran a variant graph
    variant = next(iter(pm.peft_variants.graphs.values()))
    assert isinstance(variant.get_submodule("model.layers.1"), LayerBlock)
    assert abs(loss0 - loss1).item() <= TOL
    assert max((g0[k] - g1[k]).abs().max().item() for k in g0) <= TOL
    assert kept1 < 0.6 * kept0


def test_two_models_of_one_module_keep_their_own_setting():
    base = M.llama()
    ex = {"input_ids": M.ids()}
    a, b = (peftfx.apply(base, LoRA(rank=2), ex) for _ in range(2))
    peftfx.gradient_checkpointing(a)
    assert a.is_gradient_checkpointing and not b.is_gradient_checkpointing
    b.eval()                                          # b's variant graph: not layered
    with torch.no_grad():
        b(**ex)
    variant = next(iter(b.peft_variants.graphs.values()))
    assert not any(isinstance(m, LayerBlock) for m in variant.modules())


def test_no_blocks_is_an_error_and_changes_nothing():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    pm = peftfx.apply(Two(), LoRA(rank=2, targets=peftfx.select.name("a")), {"x": torch.randn(2, 8)})
    code = pm.code
    with pytest.raises(PeftfxError, match="no repeated blocks"):
        peftfx.gradient_checkpointing(pm)
    assert pm.code == code and not pm.is_gradient_checkpointing
    assert not any(isinstance(m, LayerBlock) for m in pm.modules())


def test_fsdp_blocks_refuse_a_weight_read_outside_its_block():
    pytest.importorskip("torch.distributed.fsdp")
    from peftfx.integrations.fsdp import fully_shard_blocks

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x)) @ self.blocks[0].weight     # block 0's weight read by the root

    pm = peftfx.apply(Tied(), LoRA(rank=2, targets=peftfx.select.all()), {"x": torch.randn(2, 8)})
    with pytest.raises(PeftfxError, match=r"blocks\.0\.weight .* also read outside"):
        fully_shard_blocks(pm)
    assert not any(isinstance(m, LayerBlock) for m in pm.modules())          # nothing changed


# ------------------------------------------------------------------------------------------------ FSDP2
def _fsdp_setup():
    torch.manual_seed(0)
    return _setup().train()        # the graph apply() traced (train mode, these inputs): the one FSDP2 shards


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {c: _fsdp_train(rank, c) for c in (False, True)}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp_train(rank: int, checkpoint: bool) -> dict:
    from torch.distributed.tensor import DTensor

    from peftfx.integrations.fsdp import fully_shard_blocks

    pm = _fsdp_setup()
    total = sum(p.numel() * p.element_size() for p in pm.parameters())
    units = fully_shard_blocks(pm)
    if checkpoint:
        peftfx.gradient_checkpointing(pm)
    local = sum(p.to_local().numel() * p.element_size() if isinstance(p, DTensor) else
                p.numel() * p.element_size() for p in pm.parameters())
    seen = []                                         # per block call: is it gathered, are the others sharded?

    def probe(module, args):                          # runs after FSDP2's pre-forward (all-gather)
        mine = module.self_attn.q_proj.weight
        others = [b.self_attn.q_proj.weight for b in pm.model.layers.children() if b is not module]
        seen.append((not isinstance(mine, DTensor), all(isinstance(o, DTensor) for o in others)))

    for b in pm.model.layers.children():
        b.register_forward_pre_hook(probe)
    _sgd(pm, lambda step: pm(**_data(rank, step)).loss)
    lora = {n: p.full_tensor().detach().clone() for n, p in pm.named_parameters() if ".lora." in n}
    pm.eval()                                         # eval mode, other inputs: a variant graph, run on the units
    with torch.no_grad():
        logits = pm(input_ids=M.ids(batch=2, seq=8, seed=99)).logits
    return {"lora": lora, "units": units, "total": total, "local": local, "seen": seen, "eval": logits}


def test_fsdp2_per_block_two_processes(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    # reference: one process, each step on both ranks' batches (the mean of equal halves = FSDP's averaged grads)
    torch.manual_seed(0)
    pm = _fsdp_setup()
    _sgd(pm, lambda step: sum(pm(**_data(r, step)).loss for r in (0, 1)) / 2)
    ref = {k: v for k, v in pm.state_dict().items() if ".lora." in k}
    pm.eval()
    with torch.no_grad():
        ref_eval = pm(input_ids=M.ids(batch=2, seq=8, seed=99)).logits
    start = _fsdp_setup().state_dict()
    assert max((ref[k] - start[k]).abs().max().item() for k in ref) > 1e-3      # it did train
    for checkpoint in (False, True):                  # per block alone, and with activation checkpointing
        r0, r1 = (torch.load(tmp_path / f"rank{r}.pt")[checkpoint] for r in (0, 1))
        assert r0["units"] == ["model.layers.0", "model.layers.1", ""]    # one unit per block, then the root
        assert len(r0["seen"]) == 2 * STEPS + 2        # 2 blocks × (3 train steps + the eval call): all via the units
        assert all(gathered and others_sharded for gathered, others_sharded in r0["seen"])
        # per-rank parameter memory: every parameter is sharded in two (dim-0 shards of these shapes are even)
        assert r0["local"] == r1["local"] == r0["total"] // 2
        assert set(ref) == set(r0["lora"])
        assert max((ref[k] - r0["lora"][k]).abs().max().item() for k in ref) < 1e-6
        assert max((ref[k] - r1["lora"][k]).abs().max().item() for k in ref) < 1e-6
        assert (r0["eval"] - ref_eval).abs().max().item() < 1e-5 and torch.equal(r0["eval"], r1["eval"])


# FSDP2 on 4 ranks: per block against the root-unit variant, one spawn for both
WORLD4, LAYERS4 = 4, 4


def _fsdp4_setup():
    return _setup(layers=LAYERS4).train()


def _fsdp4_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD4)
    try:
        torch.save({v: _fsdp4_train(rank, v) for v in ("blocks", "root")}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp4_train(rank: int, variant: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    from peftfx.integrations.fsdp import (
        GatheredPeak,
        fully_shard_blocks,
        local_bytes,
        original_bytes,
        release_original,
    )

    pm = _fsdp4_setup()
    layers = list(pm.model.layers.children())
    sizes = {"total": local_bytes(pm), "root_only": local_bytes(pm) - sum(local_bytes(b) for b in layers),
             "block": local_bytes(layers[0]),
             "adapters": sum(p.numel() * p.element_size() for p in pm.parameters() if p.requires_grad)}
    if variant == "blocks":
        fully_shard_blocks(pm)                        # releases the original module's full tensors itself
        sizes["held"] = None
    else:
        fully_shard(pm)
        sizes["held"] = original_bytes(pm)            # the traced-from module still holds the whole base
        release_original(pm)
    sizes["released"] = original_bytes(pm)
    sizes["n_origin"] = len(list(pm.__dict__["_peftfx_origin"][0].parameters()))
    with GatheredPeak(pm) as peak:
        _sgd(pm, lambda step: pm(**_data(rank, step)).loss)
    lora = {n: p.full_tensor().detach().clone() for n, p in pm.named_parameters() if ".lora." in n}
    return {"lora": lora, "local": local_bytes(pm), "peak": peak.bytes, **sizes}


def test_fsdp2_four_processes_per_block_vs_root_unit(tmp_path):
    """4 gloo processes, a 4-block Llama with LoRA, 3 SGD steps on different data per rank, sharded per block
    (``fully_shard_blocks``) and at the root only (``fully_shard(model)``), in one spawn. Both end with the adapter
    weights of one process training on all four ranks' data (within 1e-6); each rank holds exactly a quarter of
    the parameter bytes; and the most unsharded parameter bytes alive at once (``GatheredPeak``: sampled at every
    module entry/exit and every saved tensor, forward and backward) is the whole model for the root unit but only
    the root unit's own parameters plus at most two blocks (the one running and the one FSDP2 prefetches in
    backward) per block — a deterministic count, not RSS. The module ``apply`` traced held the whole base beside the
    shards until ``release_original`` (``fully_shard_blocks`` calls it): after it, one float per weight."""
    pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    mp.spawn(_fsdp4_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD4, join=True)
    pm = _fsdp4_setup()                                # reference: one process, each step on all ranks' batches
    start = {k: v.clone() for k, v in pm.state_dict().items() if ".lora." in k}
    _sgd(pm, lambda step: sum(pm(**_data(r, step)).loss for r in range(WORLD4)) / WORLD4)
    ref = {k: v for k, v in pm.state_dict().items() if ".lora." in k}
    assert max((ref[k] - start[k]).abs().max().item() for k in ref) > 1e-3      # it did train
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD4)]
    for res in results:
        for variant in ("blocks", "root"):
            got = res[variant]
            assert set(got["lora"]) == set(ref)
            assert max((ref[k] - got["lora"][k]).abs().max().item() for k in ref) < 1e-6, variant
            assert got["local"] * WORLD4 == got["total"], variant          # every dim 0 here divides by 4
            assert got["released"] <= 4 * got["n_origin"], variant        # stand-ins: one float each
        blocks, root = res["blocks"], res["root"]
        assert root["held"] == root["total"] - root["adapters"]           # before release_original: a full copy
        assert root["peak"] == root["total"]                               # the root unit gathers everything
        assert blocks["root_only"] + blocks["block"] <= blocks["peak"] <= blocks["root_only"] + 2 * blocks["block"]
        assert blocks["peak"] < root["peak"]


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_checkpointing_other_block_layouts(name):
    """GPT-2 (transformer.h.N, fused c_attn) and T5 (encoder and decoder blocks; block 0's position bias feeds the
    others): every block found, gradients unchanged."""
    ids = M.ids()
    model, ex = (M.gpt2(), {"input_ids": ids}) if name == "gpt2" else (M.t5(), {"input_ids": ids,
                                                                                 "decoder_input_ids": ids})
    pm = peftfx.apply(model, LoRA(rank=4, dropout=0.1, targets=peftfx.select.all()), ex)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    pm.train()

    def grads():
        pm.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        pm(**ex).logits.logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    g0 = grads()
    paths = peftfx.gradient_checkpointing(pm)
    want = (["transformer.h.0", "transformer.h.1"] if name == "gpt2" else
            ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"])
    assert paths == want
    g1 = grads()
    assert max((g0[k] - g1[k]).abs().max().item() for k in g0) <= TOL
