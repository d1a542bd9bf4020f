"""The in-process trace cache (peftfx.trace_cache): a second model of the same architecture reuses the graph,
bound to its own tensors; anything that could change the graph is a miss; nothing of the first model is kept."""
import gc
import weakref

import pytest
import torch
from torch import nn

import peftfx
from peftfx import IA3, DoRA, Houlsby, LoRA, select, trace_cache
from tests import models as M


@pytest.fixture(autouse=True)
def _fresh_cache():
    trace_cache.clear()
    yield
    trace_cache.clear()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("factory", [M.llama, M.gpt2], ids=["llama", "gpt2-tied"])
def test_second_instance_hits_and_runs_on_its_own_weights(factory):
    a, b = factory(seed=0).eval(), factory(seed=1).eval()
    ids, other = M.ids(2, 8), M.ids(3, 11, seed=4)                 # the second shape checks the graph stays dynamic
    pa = peftfx.trace(a, {"input_ids": ids})
    pb = peftfx.trace(b, {"input_ids": ids})
    assert trace_cache.info()["misses"] == 1 and trace_cache.info()["hits"] == 1
    for pm, model in ((pa, a), (pb, b)):
        for x in (ids, other):
            assert torch.allclose(_logits(pm.eval(), x), _logits(model, x), atol=1e-5)
    own = {id(t) for t in list(b.parameters()) + list(b.buffers())}
    assert all(id(p) in own for p in pb.parameters())              # bound to b's tensors, nothing copied
    assert (_logits(pa, ids) - _logits(pb, ids)).abs().max() > 1e-3      # and they differ from a's


def test_anything_that_changes_the_graph_misses():
    ids = M.ids(2, 8)
    peftfx.trace(M.llama(), {"input_ids": ids})
    peftfx.trace(M.llama(layers=3), {"input_ids": ids})                       # config
    peftfx.trace(M.llama(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})   # input names
    peftfx.trace(M.llama(), {"input_ids": ids.to(torch.int32)})               # input dtype
    peftfx.trace(M.llama(), {"input_ids": ids}, dynamic=False)                # static shapes
    peftfx.trace(M.llama(), {"input_ids": M.ids(2, 9)}, dynamic=False)        # static: other sizes
    assert trace_cache.info()["misses"] == 6 and trace_cache.info()["hits"] == 0
    peftfx.trace(M.llama(seed=3), {"input_ids": M.ids(4, 5)})                 # dynamic: sizes do not matter
    assert trace_cache.info()["hits"] == 1


def test_load_adapter_on_a_second_instance_does_not_trace_again(tmp_path):
    ids = M.ids(2, 8)
    peft = peftfx.apply(M.llama(), LoRA(rank=4), {"input_ids": ids})
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    peftfx.save_adapter(peft, tmp_path / "a")
    misses = trace_cache.info()["misses"]
    fresh = M.llama()
    loaded = peftfx.load_adapter(fresh, tmp_path / "a", {"input_ids": ids})
    assert trace_cache.info()["misses"] == misses and trace_cache.info()["hits"] == 1
    x = M.ids(3, 6, seed=5)
    assert torch.allclose(_logits(loaded.eval(), x), _logits(peft.eval(), x), atol=1e-6)


def test_plain_modules_and_the_switch_are_never_cached(monkeypatch):
    class Net(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.lin, self.scale = nn.Linear(4, 4), scale     # an attribute no key can see

        def forward(self, x):
            return self.lin(x) * self.scale

    x = torch.randn(2, 4)
    p1, p2 = peftfx.trace(Net(1.0), (x,)), peftfx.trace(Net(3.0), (x,))
    assert trace_cache.info()["uncached"] == 2 and trace_cache.info()["entries"] == 0
    assert not torch.allclose(p1(x), p2(x))
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "0")
    peftfx.trace(M.llama(), {"input_ids": M.ids()})
    peftfx.trace(M.llama(), {"input_ids": M.ids()})
    assert trace_cache.info()["uncached"] == 4 and trace_cache.info()["hits"] == 0


def test_the_cache_keeps_no_tensor_of_a_traced_model():
    model = M.llama()
    ref = weakref.ref(model.model.embed_tokens.weight)
    pm = peftfx.trace(model, {"input_ids": M.ids()})
    del model, pm
    gc.collect()
    assert trace_cache.info()["entries"] == 1 and ref() is None


# ------------------------------------------------------------------------------- apply's cache (second level)


def _state(pm):
    return list(pm.state_dict(keep_vars=True).items())


def _train_out_and_grads(pm, x, seed=11):
    """Train-mode logits (dropout drawn from ``seed``) and every trainable parameter's gradient."""
    pm.train()
    torch.manual_seed(seed)
    out = pm(input_ids=x).logits
    out.square().mean().backward()
    return out.detach(), [(n, p.grad.clone()) for n, p in pm.named_parameters() if p.requires_grad]


def _assert_same_result(cold, hit, fresh, x):
    """``hit`` is ``cold`` bit for bit: state_dict (keys in order, values bitwise), module tree, trainable names,
    adapter records, code, modes, train-mode outputs and gradients; ``fresh()`` the base model, which they differ
    from."""
    a, b = _state(cold), _state(hit)
    assert [k for k, _ in a] == [k for k, _ in b]
    assert all(torch.equal(u, v) and u.requires_grad == v.requires_grad for (_, u), (_, v) in zip(a, b))
    assert [n for n, _ in cold.named_modules()] == [n for n, _ in hit.named_modules()]
    assert [n for n, p in cold.named_parameters() if p.requires_grad] == \
        [n for n, p in hit.named_parameters() if p.requires_grad]
    assert cold.peft_info.adapters == hit.peft_info.adapters
    assert hit.code == cold.code and hit.training == cold.training
    assert all(m.training == cold.get_submodule(n).training for n, m in hit.named_modules())
    with torch.no_grad():            # live adapters (B starts at zero), the same perturbation on both
        for (_, p), (_, q) in zip(cold.named_parameters(), hit.named_parameters()):
            if p.requires_grad:
                noise = 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                p.add_(noise), q.add_(noise)
    out_a, grads_a = _train_out_and_grads(cold, x)
    out_b, grads_b = _train_out_and_grads(hit, x)
    assert torch.equal(out_a, out_b) and (out_a - _logits(fresh().train(), x)).abs().max() > 1e-4
    assert [n for n, _ in grads_a] == [n for n, _ in grads_b]
    assert all(torch.equal(g, h) for (_, g), (_, h) in zip(grads_a, grads_b))
    assert peftfx.print_trainable(hit, file=None) == peftfx.print_trainable(cold, file=None)


@pytest.mark.parametrize("factory,rule", [
    (M.llama, LoRA(rank=4, alpha=8, dropout=0.1)),
    (M.gpt2, LoRA(rank=4, targets=select.role("attn.qkv"), init="gaussian")),
    (M.llama, DoRA(rank=4)),
    (M.llama, IA3()),
    (M.llama, Houlsby(bottleneck=8)),
], ids=["lora-llama", "lora-gpt2-fused", "dora", "ia3", "houlsby"])
def test_a_hit_of_applys_cache_equals_a_cold_apply_bit_for_bit(monkeypatch, factory, rule):
    """Same seed → the same adapter weights, the same state_dict (keys in order, values bitwise), the same trainable
    names, module tree, code, train-mode outputs and gradients, and the same RNG state after, as ``apply`` with every
    cache off (``torch.export`` run again)."""
    ids, x = M.ids(2, 8), M.ids(3, 5, seed=3)
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "0")
    torch.manual_seed(7)
    cold = peftfx.apply(factory(seed=1), rule, {"input_ids": ids})
    rng_cold = torch.get_rng_state()
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "1")
    peftfx.apply(factory(seed=0), rule, {"input_ids": ids})                     # fills the cache
    torch.manual_seed(7)
    hit = peftfx.apply(factory(seed=1), rule, {"input_ids": ids})
    assert torch.equal(torch.get_rng_state(), rng_cold)
    assert trace_cache.info()["applied_hits"] == 1 and "_peftfx_shared_graph" in hit.__dict__
    _assert_same_result(cold, hit, lambda: factory(seed=1), x)
    assert sorted(hit.__dict__) == sorted(cold.__dict__)          # its own graph now (taken by the variant)


def test_models_built_from_applys_cache_share_no_mutable_state():
    ids, x = M.ids(2, 8), M.ids(3, 5, seed=3)
    rule = LoRA(rank=4)
    first = peftfx.apply(M.llama(seed=0), rule, {"input_ids": ids})
    b = peftfx.apply(M.llama(seed=1), rule, {"input_ids": ids})
    c = peftfx.apply(M.llama(seed=1), rule, {"input_ids": ids})
    assert trace_cache.info()["applied_hits"] == 2
    assert all("_peftfx_shared_graph" in m.__dict__ for m in (b, c))
    nodes = len(first.graph.nodes)
    with torch.no_grad():
        for m in (b, c):
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.1)
    before_c = _logits(c.eval(), x)                                   # eval: c's own graph (variant) taken
    ids_b = {id(t) for t in list(b.parameters()) + list(b.buffers())}
    assert not ids_b & {id(t) for n, t in c.named_parameters() if t.requires_grad}     # adapters are new per hit
    assert not ids_b & {id(t) for t in c.buffers()} - {id(t) for t in M.llama().buffers()}
    assert b.graph is not c.graph and not {id(n.meta) for n in b.graph.nodes} & {id(n.meta) for n in c.graph.nodes}
    assert not {id(n.meta["peftfx"]) for n in b.graph.nodes if "peftfx" in n.meta} \
        & {id(n.meta["peftfx"]) for n in c.graph.nodes if "peftfx" in n.meta}
    merged = peftfx.merge(b.eval(), inplace=True)                     # b's graph loses its adapter nodes
    assert merged is b and len(b.graph.nodes) < nodes
    assert torch.equal(_logits(c, x), before_c) and len(c.graph.nodes) == nodes     # c unchanged
    assert all(rec.merged for rec in b.peft_info.adapters.values())
    assert not any(rec.merged for rec in c.peft_info.adapters.values())
    d = peftfx.apply(M.llama(seed=1), rule, {"input_ids": ids})     # the cached template is unchanged
    assert len(d.graph.nodes) == nodes and d.code == first.code


def test_rules_differing_in_any_field_miss_applys_cache(monkeypatch):
    ids = M.ids(2, 8)
    base = LoRA(rank=4, alpha=8.0, dropout=0.0, targets=select.role("attn.q"))
    peftfx.apply(M.llama(), base, {"input_ids": ids})
    q = select.role("attn.q")
    others = [LoRA(rank=8, alpha=8.0, targets=q), LoRA(rank=4, alpha=16.0, targets=q),
              LoRA(rank=4, alpha=8.0, dropout=0.1, targets=q), LoRA(rank=4, alpha=8.0, targets=select.role("attn.v")),
              LoRA(rank=4, alpha=8.0, targets=q, rslora=True), LoRA(rank=4, alpha=8.0, targets=q, init="gaussian"),
              LoRA(rank=4, alpha=8.0, targets=q, fused="split"), DoRA(rank=4, alpha=8.0, targets=q),
              [base, IA3(targets=select.role("mlp.down"))]]
    for rule in others:
        pm = peftfx.apply(M.llama(), rule, {"input_ids": ids})
        assert trace_cache.info()["applied_hits"] == 0, rule
        assert pm.peft_info.rules == (rule if isinstance(rule, list) else [rule])
    ranks = {peftfx.apply(M.llama(), r, {"input_ids": ids}).get_submodule("model.layers.0.self_attn.q_proj.lora")
             .lora_A.shape[0] for r in (base, others[0])}
    assert ranks == {4, 8} and trace_cache.info()["applied_hits"] == 2        # each its own entry, hit again
    peftfx.apply(M.llama(), LoRA(rank=4, alpha=8.0, targets=select.role("attn.q")), {"input_ids": ids})   # equal fields
    assert trace_cache.info()["applied_hits"] == 3
    peftfx.apply(M.llama(), base, {"input_ids": M.ids(2, 8).to(torch.int32)})           # other inputs
    peftfx.apply(M.llama().train(), base, {"input_ids": ids})                            # other mode
    assert trace_cache.info()["applied_hits"] == 3
    monkeypatch.setenv("PEFTFX_APPLY_CACHE", "0")                                         # the switch
    peftfx.apply(M.llama(), base, {"input_ids": ids})
    assert trace_cache.info()["applied_hits"] == 3


def test_a_hit_built_model_saves_loads_and_adds_adapters(tmp_path):
    ids, x = M.ids(2, 8), M.ids(3, 5, seed=3)
    peftfx.apply(M.llama(seed=0), LoRA(rank=4), {"input_ids": ids})
    hit = peftfx.apply(M.llama(seed=1), LoRA(rank=4), {"input_ids": ids})
    assert trace_cache.info()["applied_hits"] == 1
    with torch.no_grad():
        for p in hit.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peftfx.save_adapter(hit, tmp_path / "a")
    loaded = peftfx.load_adapter(M.llama(seed=1), tmp_path / "a", {"input_ids": ids})
    assert trace_cache.info()["applied_hits"] == 1          # loading fills adapters: the trace cache only
    assert torch.allclose(_logits(loaded.eval(), x), _logits(hit.eval(), x), atol=1e-6)
    before = _logits(hit.eval(), x)
    peftfx.add_adapter(hit, "second", LoRA(rank=2))                  # changes hit's graph, not the cache's
    with torch.no_grad():
        for n, p in hit.named_parameters():
            if "second" in n:
                p.add_(0.05)
    peftfx.set_active(hit, "second")
    assert (_logits(hit, x) - before).abs().max() > 1e-4
    peftfx.set_active(hit, "default")
    assert torch.allclose(_logits(hit, x), before, atol=1e-6)
    again = peftfx.apply(M.llama(seed=1), LoRA(rank=4), {"input_ids": ids})
    assert trace_cache.info()["applied_hits"] == 2 and len(again.graph.nodes) == len(loaded.graph.nodes)


def test_diffusers_config_is_keyed_with_what_is_set_after_construction():
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    def unet():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()

    ex = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([3, 7]),
          "encoder_hidden_states": torch.randn(2, 5, 32)}
    a, b = unet(), unet()
    key = trace_cache.key_of(a, ex, True)
    assert key is not None and key == trace_cache.key_of(b, ex, True)        # a FrozenDict config: cached
    b.set_attn_processor(AttnProcessor())                                     # another attention processor
    assert trace_cache.key_of(b, ex, True) != key
    c = unet()
    c.down_blocks[0].attentions[0].transformer_blocks[0].set_chunk_feed_forward(2, 1)   # an attribute set later
    assert trace_cache.key_of(c, ex, True) != key
    assert trace_cache.key_of(unet(), ex | {"sample": torch.randn(2, 4, 8, 8).double()}, True) != key


def test_a_graph_traced_at_sequence_1_never_serves_longer_inputs():
    """torch.export keeps a size-1 sequence static: that graph must not serve length 8; a graph symbolic in the
    sequence serves length 1 too (as the dynamic graphs always did)."""
    short, long = M.ids(2, 1), M.ids(2, 8)
    p1 = peftfx.trace(M.llama(), {"input_ids": short})
    p8 = peftfx.trace(M.llama(), {"input_ids": long})
    assert trace_cache.info()["misses"] == 2 and trace_cache.info()["hits"] == 0
    assert torch.allclose(_logits(p8.eval(), long), _logits(M.llama(), long), atol=1e-5)
    trace_cache.clear()
    peftfx.trace(M.llama(), {"input_ids": long})
    p = peftfx.trace(M.llama(seed=2), {"input_ids": short})
    assert trace_cache.info()["hits"] == 1
    for x in (short, M.ids(3, 5)):
        assert torch.allclose(_logits(p.eval(), x), _logits(M.llama(seed=2), x), atol=1e-5)
    assert torch.allclose(_logits(p1.eval(), short), _logits(M.llama(), short), atol=1e-5)


def test_a_mode_switch_on_a_hit_reuses_the_graph_another_model_switched_to(monkeypatch):
    """An eval-mode model's first ``train()`` rewrites dropout and generates code; apply's cache keeps that result,
    so the next model of the entry switches with neither (its graph still shared) — and runs as a cold one does."""
    ids, x = M.ids(2, 8), M.ids(3, 5, seed=3)
    rule = LoRA(rank=4, dropout=0.2)
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "0")
    torch.manual_seed(3)
    cold = peftfx.apply(M.llama(seed=1), rule, {"input_ids": ids})          # eval mode, as M.llama returns it
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "1")
    peftfx.apply(M.llama(seed=0), rule, {"input_ids": ids})                 # fills the cache
    first = peftfx.apply(M.llama(seed=0), rule, {"input_ids": ids}).train()  # a hit: records its train graph
    assert "_peftfx_shared_graph" not in first.__dict__
    torch.manual_seed(3)
    hit = peftfx.apply(M.llama(seed=1), rule, {"input_ids": ids})
    assert trace_cache.info()["applied_hits"] == 2 and not hit.training
    hit.train()
    assert "_peftfx_shared_graph" in hit.__dict__                            # no copy, no pass
    cold.train()
    assert hit.code == cold.code
    with torch.no_grad():                               # live adapters (B starts at zero), alike on both
        for p, q in zip(cold.parameters(), hit.parameters()):
            if p.requires_grad:
                p.add_(0.1), q.add_(0.1)
    out_cold, grads_cold = _train_out_and_grads(cold, x)
    out_hit, grads_hit = _train_out_and_grads(hit, x)
    assert torch.equal(out_cold, out_hit) and all(torch.equal(g, h) for (_, g), (_, h) in zip(grads_cold, grads_hit))
    torch.manual_seed(0)
    again = cold(input_ids=x).logits
    assert not torch.equal(again, out_cold)                                  # dropout is on in train mode
    with torch.no_grad():
        hit.eval(), cold.eval()
        assert torch.equal(hit(input_ids=x).logits, cold(input_ids=x).logits)


# ---------------------------------------------------------- a trace-cache hit with other rules (apply's cache off)


@pytest.mark.parametrize("factory,rule", [
    (M.llama, LoRA(rank=4, alpha=8, dropout=0.1, targets=select.role("attn.q", "attn.v", "mlp.down"))),
    (M.llama, IA3()),
    (M.llama, Houlsby(bottleneck=8)),
    (M.gpt2, LoRA(rank=4, targets=select.role("attn.qkv"), init="gaussian")),
    (M.llama, LoRA(rank=2, targets=select.name("*.mlp.*_proj"))),
], ids=["lora-roles", "ia3", "houlsby", "lora-gpt2-fused", "lora-name-glob"])
def test_a_trace_cache_hit_with_new_rules_equals_a_cold_apply_bit_for_bit(monkeypatch, factory, rule):
    """apply's cache off: the graph is reused, and the sites and roles found on the first hit (another rule) are
    reused by later hits (no role detection runs), and the result equals an apply with every cache off."""
    import peftfx.plan as plan_module

    ids, x = M.ids(2, 8), M.ids(3, 5, seed=3)
    monkeypatch.setenv("PEFTFX_APPLY_CACHE", "0")
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "0")
    torch.manual_seed(7)
    cold = peftfx.apply(factory(seed=1), rule, {"input_ids": ids})
    rng_cold = torch.get_rng_state()
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "1")
    other = LoRA(rank=3, targets=select.role("attn.o"))
    peftfx.apply(factory(seed=0), other, {"input_ids": ids})                     # a miss: traced
    peftfx.apply(factory(seed=2), other, {"input_ids": ids})                     # a hit: analysis kept
    runs = []
    real = plan_module.assign_roles
    monkeypatch.setattr(plan_module, "assign_roles", lambda *a: (runs.append(1), real(*a))[1])
    torch.manual_seed(7)
    hit = peftfx.apply(factory(seed=1), rule, {"input_ids": ids})
    assert torch.equal(torch.get_rng_state(), rng_cold)
    assert trace_cache.info()["hits"] == 2 and trace_cache.info()["applied_hits"] == 0 and not runs
    _assert_same_result(cold, hit, lambda: factory(seed=1), x)


def test_the_cached_analysis_never_takes_a_change():
    """Sites handed out from the cached analysis are new objects on the new graph's nodes: changing them, and
    passes changing the graph they sit on, leave what later hits get unchanged."""
    ids = M.ids(2, 8)
    ex = {"input_ids": ids}
    want = str(peftfx.inspect(M.gpt2(seed=0), None, ex))                          # a miss: traced
    first = peftfx.inspect(M.gpt2(seed=1), None, ex)                             # the first hit keeps its analysis
    (entry,) = trace_cache._CACHE.values()
    assert len(entry.analysis) == 1 and str(first) == want
    again = peftfx.inspect(M.gpt2(seed=2), None, ex)                             # from the cache
    assert str(again) == want
    graph = again.plan.sites[0].node.graph
    assert graph is not first.plan.sites[0].node.graph and all(s.node.graph is graph for s in again.plan.sites)
    for s in again.plan.sites:                                   # change everything a pass or rule could
        s.roles.add("attn.bogus")
        s.slices["attn.q"] = (0, 1)
        s.key += ".x"
    qkv = next(s for s in again.plan.sites if "attn.qkv" in s.roles)
    qkv.node.name = "renamed"
    peft = peftfx.apply(M.gpt2(seed=3), LoRA(rank=4, targets=select.role("attn.qkv")), ex)  # splices a hit graph
    assert any("lora" in n.name for n in peft.graph.nodes)
    peftfx.merge(peft, inplace=True)
    assert str(peftfx.inspect(M.gpt2(seed=4), None, ex)) == want
    assert trace_cache.info()["misses"] == 1


def test_a_pass_manager_lints_once_and_names_the_pass_that_broke_the_graph():
    """In-place passes under a PassManager are linted once, when it ends (not after each pass): a graph one of them
    left invalid raises PassError naming it, and the module keeps no mark of the run."""
    from peftfx._errors import PassError
    from peftfx.passes.base import PassManager, PassResult, graph_pass

    pm = peftfx.trace(M.llama(), {"input_ids": M.ids()})

    @graph_pass("use_before_def")
    def broken(gm):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        first, last = nodes[0], nodes[-1]
        first.args = (last,) + tuple(first.args[1:])           # reads a value computed after it
        return PassResult(gm, True)

    @graph_pass("touch")
    def touch(gm):
        return PassResult(gm, True)

    lints = []
    real = type(pm.graph).lint
    type(pm.graph).lint = lambda g: (lints.append(1), real(g))[1]
    try:
        PassManager([touch.bind(), touch.bind()])(pm)
        assert len(lints) == 1
        with pytest.raises(PassError, match=r"pass 'use_before_def': left an invalid graph \(or one run after it: "
                                            r"touch\)"):
            PassManager([broken.bind(), touch.bind()])(pm)
    finally:
        type(pm.graph).lint = real
    assert not {"_peftfx_lint", "_peftfx_defer_recompile"} & set(pm.__dict__)


@pytest.mark.parametrize("factory", [M.llama, M.gpt2, M.bert, M.t5], ids=["llama", "gpt2", "bert", "t5"])
def test_the_fast_graph_copy_equals_fxs_own(factory):
    """trace_cache's node-by-node copy gives what ``Graph.graph_copy`` + ``Graph.output`` give: the same nodes (name,
    op, target, arguments, type, meta), the same name bookkeeping (so nodes added later get the same names) and the
    same code; nothing shared but the meta values."""
    from peftfx._graphcopy import _copy_graph, _fx_copy_graph

    model = factory()
    ex = {"input_ids": M.ids()} if factory is not M.t5 else {"input_ids": M.ids(), "decoder_input_ids": M.ids()}
    pm = peftfx.trace(model, ex)
    fast, ref = _copy_graph(pm.graph), _fx_copy_graph(pm.graph)

    def describe(g):
        def types(a):
            return [type(a).__name__, [types(x) for x in a]] if isinstance(a, (tuple, list)) else \
                [type(a).__name__, {k: types(x) for k, x in a.items()}] if isinstance(a, dict) else type(a).__name__

        return [(n.name, n.op, n.target, str(n.args), str(n.kwargs), types(n.args), types(n.kwargs), n.type,
                 list(n.meta)) for n in g.nodes]

    assert describe(fast) == describe(ref) and len(fast.nodes) == len(ref.nodes) == len(pm.graph.nodes)
    fns, rns = fast._graph_namespace, ref._graph_namespace
    assert fns._used_names == rns._used_names and fns._base_count == rns._base_count
    assert {n.name: v for n, v in fns._obj_to_name.items()} == {n.name: v for n, v in rns._obj_to_name.items()}
    assert fast.python_code("self").src == ref.python_code("self").src
    for g in (fast, ref):                                   # names made later agree too
        with g.inserting_before(next(iter(g.nodes))):
            g.placeholder("x"), g.call_function(torch.ops.aten.add.Tensor, ()), g.get_attr("add")
    assert describe(fast) == describe(ref)
    assert all(a is not b and a.meta is not b.meta for a, b in zip(fast.nodes, pm.graph.nodes))
    assert [n for n in fast.nodes if n.op != "output"][-1].users                # user lists rebuilt
    fast.lint()


def test_a_graph_a_pass_changed_before_its_first_plan_is_analysed_anew(monkeypatch):
    """The cached analysis serves only a graph as its trace-cache hit gave it: a pass that modified the graph before
    its first plan (even one keeping every node name) makes that plan run the detectors, and stores nothing."""
    import peftfx.plan as plan_module
    from peftfx.passes.base import PassManager, PassResult, graph_pass

    ex = {"input_ids": M.ids()}
    peftfx.inspect(M.llama(seed=0), None, ex)                       # a miss
    want = str(peftfx.inspect(M.llama(seed=1), None, ex))           # the first hit: analysis kept
    (entry,) = trace_cache._CACHE.values()
    kept = dict(entry.analysis)

    @graph_pass("same_names")
    def same_names(gm):
        return PassResult(gm, True)

    runs = []
    real = plan_module.assign_roles
    monkeypatch.setattr(plan_module, "assign_roles", lambda *a: (runs.append(1), real(*a))[1])
    pm = peftfx.trace(M.llama(seed=2), ex)
    PassManager([same_names.bind()])(pm)
    assert str(peftfx.inspect(pm)) == want and runs == [1] and entry.analysis == kept
    assert str(peftfx.inspect(M.llama(seed=3), None, ex)) == want and runs == [1]       # a plain hit: reused


def test_site_calls_from_the_call_index_equal_a_scan_of_the_graph():
    """splice looks every site's calls up in one index of the graph (sites.call_index) instead of scanning it per
    site: the same calls for every site node, on a model whose layer is called three times (ALBERT) and on Llama."""
    import transformers

    from peftfx.sites import call_index, find_sites, site_calls

    cfg = transformers.AlbertConfig(vocab_size=128, embedding_size=32, hidden_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, intermediate_size=128)
    for model, shared in ((transformers.AlbertModel(cfg).eval(), 18), (M.llama(), 0)):
        pm = peftfx.trace(model, {"input_ids": M.ids()})
        index = call_index(pm)
        nodes = [n for s in find_sites(pm) for n in s.nodes]
        for n in nodes:
            assert site_calls(pm, n, index) == site_calls(pm, n)
        assert sum(len(site_calls(pm, n, index)) == 3 for n in nodes) == shared     # 6 sites × 3 calls (ALBERT)


def test_a_detector_registered_after_the_first_hit_is_run_on_later_hits():
    """The kept analysis is keyed by the role-detector pipeline: a detector registered since is not skipped."""
    from peftfx.roles import register_detector, unregister_detector

    ex = {"input_ids": M.ids()}
    peftfx.inspect(M.llama(seed=0), None, ex)                       # a miss
    peftfx.inspect(M.llama(seed=1), None, ex)                       # the first hit: analysis kept

    @register_detector("test_every_site", roles=("test.seen",), order=99)
    def every_site(ctx):
        for s in ctx.sites:
            s.roles.add("test.seen")

    try:
        report = peftfx.inspect(M.llama(seed=2), None, ex)
        assert report.plan.sites and all("test.seen" in s.roles for s in report.plan.sites)
    finally:
        unregister_detector("test_every_site")
    again = peftfx.inspect(M.llama(seed=3), None, ex)               # the pipeline as at the first hit: reused
    assert not any("test.seen" in s.roles for s in again.plan.sites)
