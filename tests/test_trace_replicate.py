"""Tracing each distinct repeated block once and replicating it (peftfx.trace_replicate): the replicated graph
must be the full trace's graph — outputs at two shapes (≤ 1e-6), node metadata (path, layer, module type), sites and
roles, parameters (the model's own tensors) — and anything it cannot prove falls back to the full trace."""
import logging
import types

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import peftfx
from peftfx import trace_cache, trace_replicate
from peftfx.roles import assign_roles
from peftfx.sites import find_sites
from tests import models as M

TOL = 1e-6


@pytest.fixture(autouse=True)
def _no_cache(monkeypatch):
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "0")     # each trace below really traces


def _trace(model, ex, monkeypatch, replicate: bool, **kw):
    monkeypatch.setenv("PEFTFX_TRACE_REPLICATE", "1" if replicate else "0")
    before = trace_replicate.info()
    pm = peftfx.trace(model, ex, **kw)
    after = trace_replicate.info()
    return pm, after["replicated"] - before["replicated"]


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _outputs_equal(a, b, inputs, train_seed=None, tol=TOL):
    for ex in inputs:
        if train_seed is not None:
            torch.manual_seed(train_seed)
        with torch.no_grad():
            oa = _leaves(a(**ex))
        if train_seed is not None:
            torch.manual_seed(train_seed)
        with torch.no_grad():
            ob = _leaves(b(**ex))
        assert len(oa) == len(ob) and oa
        for x, y in zip(oa, ob):
            assert x.shape == y.shape
            assert (x - y).abs().max().item() <= tol


def _meta(pm):
    return sorted((n.op, str(n.target), str(n.meta["peftfx"])) for n in pm.graph.nodes if n.op != "placeholder")


def _sites(pm):
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    return {s.key: (s.path, s.layer, s.module_type, s.op, s.kind, s.weight, s.weight_shape, s.bias,
                    sorted(s.roles), repr(s.slices), len(s.calls)) for s in sites}


def _check_same(model, ex, other, monkeypatch, kinds_traced=None, **kw):
    rep, replicated = _trace(model, ex, monkeypatch, True, **kw)
    full, _ = _trace(model, ex, monkeypatch, False, **kw)
    assert replicated == 1, "the shallow trace was not replicated"
    assert len(rep.graph.nodes) == len(full.graph.nodes)
    assert _meta(rep) == _meta(full)
    assert _sites(rep) == _sites(full)
    own = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    assert [n for n, _ in rep.named_parameters()] == [n for n, _ in full.named_parameters()]   # same order too
    assert all(id(p) in own for p in rep.parameters())          # the model's own tensors, nothing copied
    rep.eval(), full.eval()
    _outputs_equal(rep, full, [ex, other])
    return rep, full


def _lm(factory, **kw):
    return factory(**kw), {"input_ids": M.ids(2, 8)}, {"input_ids": M.ids(3, 13, seed=5)}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_replicated_equals_full_trace(name, monkeypatch):
    if name == "llama":
        model, ex, other = _lm(M.llama, layers=4)
    elif name == "gpt2":
        model, ex, other = _lm(M.gpt2, n_layer=4)
    elif name == "bert":
        model, ex, other = _lm(M.bert, layers=4)
    else:
        model = M.vit(layers=4)
        ex, other = {"pixel_values": torch.randn(2, 3, 32, 32)}, {"pixel_values": torch.randn(3, 3, 32, 32)}
    _check_same(model, ex, other, monkeypatch)


def test_t5_first_block_is_its_own_kind_and_position_bias_is_passed_along(monkeypatch):
    # block 0 owns the relative attention bias (another kind), later blocks read its output: prefix 3 of 4
    model = M.t5(layers=4)
    lists, why = trace_replicate._plan(model, {})
    assert not why and [(lst.path, lst.kinds, lst.keep) for lst in lists] == [
        ("encoder.block", [0, 1, 1, 1], 3), ("decoder.block", [0, 1, 1, 1], 3)]
    ex = {"input_ids": M.ids(2, 8), "decoder_input_ids": M.ids(2, 5, seed=2)}
    other = {"input_ids": M.ids(3, 11, seed=3), "decoder_input_ids": M.ids(3, 4, seed=4)}
    _check_same(model, ex, other, monkeypatch)


def _gemma2(layers=4):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=layers, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=128,
                                          sliding_window=4)).eval()


def test_alternating_layer_types_are_two_kinds(monkeypatch):
    # Gemma-2: sliding / full attention alternate (config.layer_types); the sliding window (4) is shorter than
    # the second shape's sequence (13), so a wrong kind would change the outputs
    model = _gemma2(layers=5)
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    lists, _ = trace_replicate._plan(model, {})
    assert [(lst.kinds, lst.keep) for lst in lists] == [([0, 1, 0, 1, 0], 3)]
    _check_same(model, {"input_ids": M.ids(2, 8)}, {"input_ids": M.ids(3, 13, seed=5)}, monkeypatch)


def test_mistral_sliding_window(monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=128,
                                             sliding_window=4)).eval()
    _check_same(model, {"input_ids": M.ids(2, 8)}, {"input_ids": M.ids(3, 13, seed=5)}, monkeypatch)


def test_train_and_eval_traces_dropout_and_static_shapes(monkeypatch):
    model, ex, other = _lm(M.bert, layers=4)
    model.config.hidden_dropout_prob = 0.1
    rep, full = _check_same(model, ex, other, monkeypatch)
    rep.train(), full.train()
    _outputs_equal(rep, full, [ex], train_seed=7)          # the same dropout masks in the same order
    rep.eval()
    _check_same(model, ex, other, monkeypatch, training=False)      # an eval-mode trace (the eval variant's)
    model, ex, _ = _lm(M.llama, layers=4)
    _check_same(model, ex, ex, monkeypatch, dynamic=False)


def test_meta_model_replicates(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=5, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    rep, replicated = _trace(model, {"input_ids": ids}, monkeypatch, True)
    full, _ = _trace(model, {"input_ids": ids}, monkeypatch, False)
    assert replicated == 1 and _meta(rep) == _meta(full) and _sites(rep) == _sites(full)


def test_apply_lora_on_replicated_graph_matches_full(monkeypatch):
    model, ex, other = _lm(M.llama, layers=3, hidden=32, inter=64, heads=2, kv_heads=1)
    pms = []
    for replicate in (True, False):
        monkeypatch.setenv("PEFTFX_TRACE_REPLICATE", "1" if replicate else "0")
        pm = peftfx.apply(model, peftfx.LoRA(rank=2, targets=peftfx.select.role("attn.*", "mlp.*")), ex)
        M.randomise_lora(pm, seed=3)
        pms.append(pm.eval())
    assert sorted(pms[0].peft_info.adapters) == sorted(pms[1].peft_info.adapters)
    trained = [{n: p for n, p in pm.named_parameters() if p.requires_grad} for pm in pms]
    assert trained[0].keys() == trained[1].keys() and len(trained[0]) == 3 * 7 * 2
    with torch.no_grad():                     # lora_A is drawn at apply(): give both the same adapter weights
        for n, p in trained[0].items():
            trained[1][n].copy_(p)
    _outputs_equal(pms[0], pms[1], [ex, other])
    merged = peftfx.merge(pms[0])
    _outputs_equal(merged, pms[1], [other], tol=1e-5)      # merging rounds differently


def test_trace_cache_hit_of_a_replicated_graph_binds_the_new_model(monkeypatch):
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "1")
    trace_cache.clear()
    try:
        a, b = M.llama(layers=4, seed=0), M.llama(layers=4, seed=1)
        ex, other = {"input_ids": M.ids(2, 8)}, {"input_ids": M.ids(3, 11, seed=4)}
        pa, replicated = _trace(a, ex, monkeypatch, True)
        pb, _ = _trace(b, ex, monkeypatch, True)
        assert replicated == 1 and trace_cache.info()["hits"] == 1
        own = {id(t) for t in list(b.parameters()) + list(b.buffers())}
        assert all(id(p) in own for p in pb.parameters())
        for pm, model in ((pa, a), (pb, b)):
            pm.eval()
            for x in (ex, other):
                with torch.no_grad():
                    assert (pm(**x).logits - model(**x).logits).abs().max() <= 1e-5
    finally:
        trace_cache.clear()


# -- fallbacks: anything that cannot be proved traces the whole model, with one log line ----------------------------

class _Block(nn.Module):
    def __init__(self, d=16, scale=1.0, index=0):
        super().__init__()
        self.lin, self.norm, self.scale, self.index = nn.Linear(d, d), nn.LayerNorm(d), scale, index

    def forward(self, x, last=False):
        return x + (2.0 if last else self.scale) * self.lin(self.norm(x))


class _Toy(nn.Module):
    """Blocks in a ModuleList; ``mode`` picks a forward that a replication must not get wrong."""

    def __init__(self, mode, n=4, scales=None, config=None):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.blocks = nn.ModuleList(_Block(scale=(scales or [1.0] * n)[i], index=i) for i in range(n))
        self.head = nn.Linear(16, 3)
        self.config = types.SimpleNamespace(num_hidden_layers=n) if config is None else config  # mode "last_config"
        self.n_layers = n                                           # read by mode "last_attr"

    def forward(self, x):
        outs, prev = [], x
        for i, blk in enumerate(self.blocks):
            if self.mode == "dense":             # a skip from two blocks back
                x, prev = blk(x) + prev, x
            elif self.mode == "between":         # model-level code between blocks
                x = blk(x) * (i + 1)
            elif self.mode == "index":           # the block index used in arithmetic
                x = blk(x) + blk.index
            elif self.mode == "last_config":     # the last block, counted by the config, runs differently
                n = self.config["num_hidden_layers"] if isinstance(self.config, dict) else self.config.num_hidden_layers
                x = blk(x, last=i == n - 1)
            elif self.mode == "last_attr":       # ... counted by a model attribute
                x = blk(x, last=i == self.n_layers - 1)
            else:
                x = blk(x)
            outs.append(x)
        if self.mode == "all":                   # every block's output returned
            return self.head(x), torch.stack(outs)
        return self.head(x)


@pytest.mark.parametrize("mode", ["all", "dense", "between", "index", "last_config", "last_attr"])
def test_unsound_forwards_fall_back_to_the_full_trace(mode, monkeypatch, caplog):
    model = _Toy(mode).eval()
    ex, other = {"x": torch.randn(2, 5, 16)}, {"x": torch.randn(3, 7, 16)}
    with caplog.at_level(logging.INFO, logger="peftfx.trace_replicate"):
        rep, replicated = _trace(model, ex, monkeypatch, True)
    assert replicated == 0
    assert sum("tracing _Toy whole" in r.getMessage() for r in caplog.records) == 1
    full, _ = _trace(model, ex, monkeypatch, False)
    _outputs_equal(rep.eval(), full.eval(), [ex, other])
    _outputs_equal(rep, model, [ex, other])


def test_plain_blocks_and_blocks_of_two_kinds_replicate(monkeypatch):
    cases = (([1.0] * 5, 2), ([1.0, 0.5, 1.0, 0.5, 1.0, 0.5], 4), ([1.0, 0.5, 1.0, 0.5, 1.0], 3),
             ([2.0, 1.0, 1.0, 1.0, 1.0], 3))
    for scales, keep in cases:
        model = _Toy("plain", n=len(scales), scales=scales).eval()
        lists, _ = trace_replicate._plan(model, {})
        assert [lst.keep for lst in lists] == [keep]
        ex, other = {"x": torch.randn(2, 5, 16)}, {"x": torch.randn(3, 7, 16)}
        rep, replicated = _trace(model, ex, monkeypatch, True)
        assert replicated == 1
        _outputs_equal(rep.eval(), model, [ex, other])


@pytest.mark.parametrize("mode", ["plain", "last_config"])
def test_a_config_held_as_a_dict(mode, monkeypatch):
    """A ``config`` that is a plain dict (no attributes: ``vars`` refuses it; tracing raised TypeError) is read
    through its items: per-layer entries make kinds (alternating ``layer_types``: a prefix of 4, not 2), the layer
    count is cut with the list (the last block, counted by the config, traced as the last: the whole model is
    traced) and restored. Train mode too (LayerDrop/SpecAugment are looked for on configs). Outputs: the eager
    model's at two shapes (≤ 1e-6)."""
    config = {"num_hidden_layers": 6, "layer_types": ["a", "b"] * 3}
    model = _Toy(mode, n=6, config=config)
    assert [lst.keep for lst in trace_replicate._plan(model, {})[0]] == [4]
    ex, other = {"x": torch.randn(2, 5, 16)}, {"x": torch.randn(3, 7, 16)}
    for train in (False, True):
        model.train(train)
        rep, replicated = _trace(model, ex, monkeypatch, True)
        assert replicated == (mode == "plain")
        assert model.config == {"num_hidden_layers": 6, "layer_types": ["a", "b"] * 3}
        _outputs_equal(rep.eval(), model.eval(), [ex, other])


def test_per_layer_flags_and_layer_dependent_attributes_fall_back(monkeypatch, caplog):
    model, ex, other = _lm(M.llama, layers=4)
    model.config.output_hidden_states = True             # one hidden state per layer in the output
    with caplog.at_level(logging.INFO, logger="peftfx.trace_replicate"):
        _, replicated = _trace(model, ex, monkeypatch, True)
    assert replicated == 0 and any("output_hidden_states=True" in r.getMessage() for r in caplog.records)
    from transformers import GPT2Config, GPT2LMHeadModel
    g = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=128,
                                   scale_attn_by_inverse_layer_idx=True)).eval()
    g.config.use_cache = False        # eager returns no cache either (its leaves count once cache pytrees exist)
    assert [lst.kinds for lst in trace_replicate._plan(g, {})[0]] == []     # every layer its own scaling: no list
    rep, replicated = _trace(g, ex, monkeypatch, True)
    assert replicated == 0
    _outputs_equal(rep.eval(), g, [other])


def test_training_step_and_checkpointing_on_a_replicated_graph(monkeypatch):
    # train mode with dropout everywhere (SDPA, adapter): loss and adapter gradients equal the full trace's, and
    # the layered view (activation checkpointing per block) finds all four blocks of the replicated graph
    model = M.llama(layers=4, hidden=32, inter=64, heads=2, kv_heads=1)
    model.config.attention_dropout = 0.1
    ids = M.ids(2, 12)
    batch = {"input_ids": ids, "labels": ids}
    rule = peftfx.LoRA(rank=2, dropout=0.1, targets=peftfx.select.role("attn.*", "mlp.*"))
    pms = []
    for replicate in (True, False):
        monkeypatch.setenv("PEFTFX_TRACE_REPLICATE", "1" if replicate else "0")
        pms.append(peftfx.apply(model, rule, batch).train())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for (n, p), (n2, p2) in zip(pms[0].named_parameters(), pms[1].named_parameters()):
            assert n == n2
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                p2.copy_(p)

    def step(pm):
        pm.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss = pm(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    (l0, g0), (l1, g1) = step(pms[0]), step(pms[1])
    assert abs(l0 - l1) <= TOL and max((g0[k] - g1[k]).abs().max().item() for k in g0) <= TOL
    assert peftfx.gradient_checkpointing(pms[0]) == [f"model.layers.{i}" for i in range(4)]
    l2, g2 = step(pms[0])
    assert abs(l0 - l2) <= TOL and max((g0[k] - g2[k]).abs().max().item() for k in g0) <= TOL


# -- the architecture sweep at 4 layers (marked sweep: `python -m pytest -m sweep -k replicate`) ---------------------

_SWEEP_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
                 "num_decoder_layers")


def _sweep_names():
    from tests.sweep.harness import ALL
    return ALL


@pytest.mark.sweep
@pytest.mark.parametrize("name", _sweep_names())
def test_sweep_replicated_equals_full_trace(name, monkeypatch, caplog):
    """Every sweep architecture with 4 layers: the default trace (replicated, or whole after a logged fallback)
    equals the whole-model trace — outputs at the sweep's two shapes (≤ 1e-6), node metadata, sites and roles."""
    from tests.sweep import harness as H
    for k in _SWEEP_LAYERS:
        monkeypatch.setitem(H._INT, k, 4)
    try:
        case = H.build(name)
    except Exception as e:  # noqa: BLE001 - a config that does not take 4 layers (LED's attention_window list)
        pytest.skip(f"does not build with 4 layers: {type(e).__name__}: {e}")
    try:
        _trace(case.model, case.example, monkeypatch, False)    # a first trace can differ (Swin sets state on it)
        full, _ = _trace(case.model, case.example, monkeypatch, False)
    except peftfx.PeftfxError as e:
        pytest.skip(f"the whole model does not trace: {str(e).splitlines()[0]}")
    with caplog.at_level(logging.INFO, logger="peftfx.trace_replicate"):
        rep, replicated = _trace(case.model, case.example, monkeypatch, True)
    why = [r.getMessage() for r in caplog.records if "whole" in r.getMessage()]
    print(f"{name}: {'replicated' if replicated else 'whole: ' + (why[0] if why else 'no repeated blocks')}")
    assert _meta(rep) == _meta(full) and _sites(rep) == _sites(full)
    rep.eval(), full.eval()
    _outputs_equal(rep, full, [case.example, case.other], train_seed=0)   # seeded: BEiT's eval graph draws
