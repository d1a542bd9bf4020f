"""The in-process trace cache (peftfx.trace_cache): a second model of the same architecture reuses the graph,
bound to its own tensors; anything that could change the graph is a miss; nothing of the first model is kept."""
import gc
import weakref

import pytest
import torch
from torch import nn

import peftfx
from peftfx import LoRA, trace_cache
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
