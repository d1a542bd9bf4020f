"""The static-then-symbolic trace (issue 10): a static ``torch.export`` at odd sizes, its sizes rewritten into
``sym_size`` expressions of the inputs.

References: the model's own eager forward at three shapes other than the traced one (max abs difference ≤ 1e-5,
eval mode); the dynamic ``torch.export`` path (``PEFTFX_SYMBOLIC_TRACE=0``) for the sites, roles and the dynamic
axes the ONNX export reads off the placeholders. Fallbacks: a branch on the sequence length and a hidden constant
equal to the traced size must send the trace to the dynamic export, with a log line.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import peftfx
from peftfx import trace_symbolic as TS
from peftfx.export._build import traced_axes
from peftfx.roles import assign_roles
from peftfx.sites import find_sites

from . import models as M

TOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setenv("PEFTFX_TRACE_CACHE", "0")     # every trace below is a real trace
    monkeypatch.setenv("PEFTFX_SYMBOLIC_TRACE", "1")
    TS.clear_info()


def _trace(model, kw, symbolic=True, monkeypatch=None, **opts):
    if not symbolic:
        monkeypatch.setenv("PEFTFX_SYMBOLIC_TRACE", "0")
    try:
        return peftfx.trace(model, kw, **opts)
    finally:
        if monkeypatch is not None:
            monkeypatch.setenv("PEFTFX_SYMBOLIC_TRACE", "1")


def _leaves(out):
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _assert_matches_eager(model, pm, make_inputs, shapes):
    model.eval()
    pm.eval()
    for shape in shapes:
        kw = make_inputs(*shape)
        with torch.no_grad():
            want = _leaves(model(**{**pm.peft_info.constants, **copy.deepcopy(kw)}))   # e.g. use_cache=False
            got = _leaves(pm(**copy.deepcopy(kw)))
        assert len(got) == len(want) and got, shape
        for a, b in zip(got, want):
            assert a.shape == b.shape, (shape, a.shape, b.shape)
            assert (a.float() - b.float()).abs().max().item() <= TOL, shape


def _roles(pm):
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    return {s.key: sorted(s.roles) for s in sites}


def _ids(b, s, vocab=128, seed=0):
    return torch.randint(3, vocab, (b, s), generator=torch.Generator().manual_seed(seed + 97 * b + s))


def _padded(b, s):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, : s // 2] = 0                       # left padding in the first row
    return mask


def _lm_inputs(b, s):
    return {"input_ids": _ids(b, s), "attention_mask": _padded(b, s)}


def _bert_inputs(b, s):
    tt = torch.zeros(b, s, dtype=torch.long)
    tt[:, s // 2:] = 1
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - s // 3:] = 0                    # right padding
    return {"input_ids": _ids(b, s), "attention_mask": mask, "token_type_ids": tt}


SHAPES = [(1, 5), (3, 11), (4, 30)]


@pytest.mark.parametrize("name,build,inputs", [
    ("llama", M.llama, _lm_inputs),
    ("gpt2", M.gpt2, _lm_inputs),
    ("bert", M.bert, _bert_inputs),
])
def test_decoder_and_encoder_models_equal_eager_and_the_dynamic_trace(name, build, inputs, monkeypatch):
    model = build()
    pm = _trace(model, inputs(2, 8))
    assert TS.info() == {"symbolic": 1, "fallback": 0}
    _assert_matches_eager(model, pm, inputs, SHAPES)
    dyn = _trace(model, inputs(2, 8), symbolic=False, monkeypatch=monkeypatch)
    assert TS.info() == {"symbolic": 1, "fallback": 0}          # the dynamic trace did not go through it
    assert _roles(pm) == _roles(dyn)
    assert traced_axes(pm, inputs(2, 8)) == traced_axes(dyn, inputs(2, 8)) is not None


def test_t5_keeps_encoder_and_decoder_lengths_apart(monkeypatch):
    model = M.t5()

    def inputs(b, s, t=None):
        return {"input_ids": _ids(b, s), "attention_mask": _padded(b, s),
                "decoder_input_ids": _ids(b, t if t is not None else max(2, s - 3), seed=5)}

    pm = _trace(model, inputs(2, 8, 5))
    assert TS.info() == {"symbolic": 1, "fallback": 0}
    holders = {n.target: n.meta["val"].shape for n in pm.graph.nodes if n.op == "placeholder"
               and isinstance(n.meta.get("val"), torch.Tensor)}
    assert str(holders["input_ids"][1]) != str(holders["decoder_input_ids"][1])
    _assert_matches_eager(model, pm, inputs, [(1, 4, 9), (3, 12, 2), (2, 7, 7)])
    dyn = _trace(model, inputs(2, 8, 5), symbolic=False, monkeypatch=monkeypatch)
    assert _roles(pm) == _roles(dyn)
    assert traced_axes(pm, inputs(2, 8, 5)) == traced_axes(dyn, inputs(2, 8, 5)) is not None


def test_lengths_equal_in_the_example_only_are_probed_and_kept_apart(caplog):
    """Source and target of 8 tokens each (the common example): one symbol would tie them for every later call.
    The model runs with them different, so the trace falls back to the dynamic export, whose graph keeps them
    apart; input ids and their mask, which the model does tie, do not make it fall back (the test above)."""
    model = M.t5()

    def inputs(b, s, t):
        return {"input_ids": _ids(b, s), "attention_mask": _padded(b, s), "decoder_input_ids": _ids(b, t, seed=5)}

    with caplog.at_level(logging.INFO, logger="peftfx.trace_symbolic"):
        pm = _trace(model, inputs(2, 8, 8))
    assert TS.info() == {"symbolic": 0, "fallback": 1}
    assert "equal in the example only" in caplog.text
    _assert_matches_eager(model, pm, inputs, [(2, 9, 4), (3, 5, 11)])


def test_vit_batch_symbolic_image_static():
    model = M.vit()
    pm = _trace(model, {"pixel_values": torch.randn(2, 3, 32, 32)})
    assert TS.info() == {"symbolic": 1, "fallback": 0}
    shape = next(n.meta["val"].shape for n in pm.graph.nodes if n.op == "placeholder")
    assert isinstance(shape[0], torch.SymInt) and list(shape[1:]) == [3, 32, 32]
    _assert_matches_eager(model, pm, lambda b: {"pixel_values": torch.randn(b, 3, 32, 32)}, [(1,), (3,), (5,)])


def test_decode_step_with_a_kv_cache():
    from peftfx.dropin import _register_cache_pytrees

    _register_cache_pytrees()
    model = M.llama()

    def inputs(b, past):
        with torch.no_grad():
            cache = model(input_ids=_ids(b, past), use_cache=True).past_key_values
        return {"input_ids": _ids(b, 1, seed=9), "attention_mask": torch.ones(b, past + 1, dtype=torch.long),
                "cache": cache, "use_cache": True}

    pm = _trace(model, inputs(2, 6), training=False)
    assert TS.info() == {"symbolic": 1, "fallback": 0}
    ids = next(n for n in pm.graph.nodes if n.op == "placeholder" and n.target == "input_ids")
    assert ids.meta["val"].shape[1] == 1                         # the one new token stays static
    _assert_matches_eager(model, pm, inputs, [(1, 3), (3, 10), (4, 17)])   # logits and the updated cache


def test_a_cache_length_equal_to_a_model_constant_is_probed_and_falls_back(caplog):
    """A cache dimension whose size equals a model constant is kept static as heads and head size are; the model
    must refuse another size there. A past length of 2 in a 2-layer model is accepted at 3: the graph would pin
    it, so the trace falls back to the dynamic export and then runs at other past lengths (the T5 decode steps
    of generate() once failed this way)."""
    from peftfx.dropin import _register_cache_pytrees

    _register_cache_pytrees()
    model = M.llama()
    assert model.config.num_hidden_layers == 2

    def inputs(b, past):
        with torch.no_grad():
            cache = model(input_ids=_ids(b, past), use_cache=True).past_key_values
        return {"input_ids": _ids(b, 1, seed=9), "attention_mask": torch.ones(b, past + 1, dtype=torch.long),
                "cache": cache, "use_cache": True}

    with caplog.at_level(logging.INFO, logger="peftfx.trace_symbolic"):
        pm = _trace(model, inputs(3, 2), training=False)
    assert TS.info() == {"symbolic": 0, "fallback": 1}
    assert "not fixed by the model" in caplog.text
    _assert_matches_eager(model, pm, inputs, [(3, 3), (2, 5)])


def test_batch_one_example_is_widened_and_stays_symbolic():
    model = M.llama()
    pm = _trace(model, _lm_inputs(1, 8))
    assert TS.info() == {"symbolic": 1, "fallback": 0}
    _assert_matches_eager(model, pm, _lm_inputs, [(1, 6), (3, 9), (2, 21)])


def test_training_graph_with_dropout_is_symbolic_and_follows_the_mode():
    """GPT-2 traced in train mode (dropout 0.1 in the graph): the check ran it under the model's own seed."""
    model = M.gpt2()
    pm = _trace(model, _lm_inputs(2, 8))
    assert TS.info() == {"symbolic": 1, "fallback": 0}
    pm.train()
    model.train()
    kw = _lm_inputs(3, 13)
    torch.manual_seed(4)
    a = pm(**kw).logits
    torch.manual_seed(4)
    b = model(**kw).logits
    assert (a - b).abs().max().item() <= TOL
    pm.eval()
    assert not torch.equal(pm(**kw).logits, a)                   # dropout is live in train mode only


class _SeqBranch(nn.Module):
    """A Python branch on the sequence length: a static trace bakes one side in."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.proj = nn.Linear(32, 32)

    def forward(self, ids):
        h = self.proj(self.emb(ids))
        return h * 2 if ids.shape[1] > 10 else h


class _HiddenConstant(nn.Module):
    """An integer the model holds outside its config and parameters (``n``), used as a size."""

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.emb = nn.Embedding(50, 32)

    def forward(self, ids):
        return self.emb(ids) * torch.arange(self.n, dtype=torch.float32).sum()


def _fallback_case(model, ids, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="peftfx.trace_symbolic"):
        pm = peftfx.trace(model, (ids,))
    assert TS.info() == {"symbolic": 0, "fallback": 1}
    assert "not used" in caplog.text and "dynamic shapes" in caplog.text
    return pm


def test_branch_on_sequence_length_falls_back(caplog, monkeypatch):
    model = _SeqBranch().eval()
    pm = _fallback_case(model, _ids(2, 12, vocab=50), caplog, monkeypatch)
    assert "differs" in caplog.text
    pm.eval()
    x = _ids(3, 14, vocab=50)
    assert (pm(x) - model(x)).abs().max().item() <= TOL


def test_hidden_constant_equal_to_the_traced_size_falls_back(caplog, monkeypatch):
    ids = _ids(2, 8, vocab=50)
    probe = _HiddenConstant(1)
    spec = {"ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}
    consts = TS._model_constants(probe)
    groups = TS._groups(TS._leaf_dims({"ids": ids}, spec, consts))
    traced_seq = TS._choose_sizes(groups, consts)[("seq", 8)]
    model = _HiddenConstant(traced_seq).eval()                   # arange(n) would be read as arange(seq)
    pm = _fallback_case(model, ids, caplog, monkeypatch)
    x = _ids(3, 5, vocab=50)
    assert (pm(x) - model(x)).abs().max().item() <= TOL


def test_a_second_shape_check_on_meta_compares_shapes():
    """A model on ``meta`` (no values): the graph is taken when its output shapes agree at the second shape."""
    with torch.device("meta"):
        model = M.llama()
    kw = {"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta")}
    pm = _trace(model, kw)
    assert TS.info() == {"symbolic": 1, "fallback": 0}
    out = pm(input_ids=torch.zeros(3, 19, dtype=torch.long, device="meta"))
    assert tuple(out.logits.shape) == (3, 19, 128)


def test_off_switch(monkeypatch):
    monkeypatch.setenv("PEFTFX_SYMBOLIC_TRACE", "0")
    peftfx.trace(M.TinyTransformer(), (_ids(2, 8, vocab=100),))
    assert TS.info() == {"symbolic": 0, "fallback": 0}


def test_an_unexpected_error_falls_back_to_the_dynamic_export(caplog, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(TS, "_rewrite", broken)
    model = M.TinyTransformer().eval()
    ids = _ids(2, 8, vocab=100)
    with caplog.at_level(logging.INFO, logger="peftfx.trace_symbolic"):
        pm = peftfx.trace(model, (ids,))
    assert TS.info() == {"symbolic": 0, "fallback": 1}
    assert "failed unexpectedly" in caplog.text and "boom" in caplog.text
    pm.eval()
    x = _ids(3, 11, vocab=100)
    assert (pm(x) - model(x)).abs().max().item() <= TOL


def test_whisper_audio_features_keep_their_mel_bins_static():
    """Whisper's (batch, mel bins, frames) features: the bins are a model constant (the first convolution's
    channels) and stay static, the batch and the decoder length are symbolic."""
    from tests.sweep import harness as H

    case = H.build("whisper")
    pm = _trace(case.model, case.example)
    assert TS.info() == {"symbolic": 1, "fallback": 0}
    feats = next(n.meta["val"].shape for n in pm.graph.nodes if n.op == "placeholder" and n.target == "input_features")
    assert isinstance(feats[0], torch.SymInt) and list(feats[1:]) == [16, 64]

    def inputs(b, t):
        return {"input_features": torch.randn(b, 16, 64, generator=torch.Generator().manual_seed(b)),
                "decoder_input_ids": _ids(b, t, vocab=100)}

    _assert_matches_eager(case.model, pm, inputs, [(1, 3), (3, 9), (4, 5)])
