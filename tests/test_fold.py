"""Fold: input-independent adapter compute (p-tuning's prompt encoder, prefix tuning's MLP and per-layer slices,
prompt tuning's table) becomes constants. Folded equals unfolded; the folded graph calls no encoder and holds no
encoder module; the unfolded model is untouched; fold composes with LoRA merge and with torch.export."""
from __future__ import annotations


import pytest
import torch

import peftfx
from peftfx import LoRA, PrefixTuning, PromptTuning, PTuning
from peftfx.methods.prefix import PrefixEncoder
from peftfx.methods.prompt import PromptEmbedding
from peftfx.methods.ptuning import PromptEncoder
from tests import models as M

TOL = 1e-6
SOURCES = (PromptEncoder, PrefixEncoder, PromptEmbedding)


def _inputs():
    ids = M.ids(3, 10)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _randomise(model) -> None:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch,rule,encoder_params", [
    ("gpt2", PTuning(num_virtual_tokens=4, encoder_hidden_size=16), "ptuning_mlp"),
    ("llama", PTuning(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8), "ptuning_lstm"),
    ("llama", PrefixTuning(num_virtual_tokens=4, projection=True, encoder_hidden_size=16), "prefix_mlp"),
    ("gpt2", PromptTuning(num_virtual_tokens=4), "prompt_embeddings"),
])
def test_folded_equals_unfolded_and_runs_no_encoder(arch, rule, encoder_params, monkeypatch):
    inputs = _inputs()
    model = peftfx.apply(getattr(M, arch)(), [rule, LoRA(rank=2)], inputs)
    _randomise(model)
    model.eval()
    n_nodes, n_params = len(model.graph.nodes), peftfx.trainable_parameters(model)[0]
    folded = peftfx.fold(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        for cls in SOURCES:           # inference must not call an encoder: make calling one fail
            monkeypatch.setattr(cls, "forward", lambda self: (_ for _ in ()).throw(AssertionError("encoder ran")))
        got = folded(**inputs).logits
    assert (got - ref).abs().max().item() < TOL
    assert not [m for m in folded.modules() if isinstance(m, SOURCES + (torch.nn.LSTM,))]
    assert not any(encoder_params in k for k in folded.state_dict())
    targets = [str(n.target) for n in folded.graph.nodes if n.op == "call_module"]
    assert targets and all(t.endswith(".lora") for t in targets)            # only LoRA still runs as a module
    assert not [n for n in folded.graph.nodes if n.op == "call_function" and "prefix_kv" in n.name]
    assert all(r.method == "lora" for r in folded.peft_info.adapters.values())
    # the unfolded model is untouched and still trains
    assert len(model.graph.nodes) == n_nodes and peftfx.trainable_parameters(model)[0] == n_params
    assert any(isinstance(m, SOURCES) for m in model.modules())


def test_fold_then_merge_and_inplace():
    inputs = _inputs()
    model = peftfx.apply(M.llama(), [PTuning(num_virtual_tokens=4), LoRA(rank=2)], inputs)
    _randomise(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        both = peftfx.merge(peftfx.fold(model))
        assert not [n for n in both.graph.nodes if n.op == "call_module"]     # nothing left to run but the base
        assert (both(**inputs).logits - ref).abs().max().item() < 1e-5
        same = peftfx.fold(model, inplace=True)
        assert same is model and (model(**inputs).logits - ref).abs().max().item() < TOL
    assert "model_embed_tokens_ptuning_folded" in dict(model.named_buffers())


def test_nothing_to_fold_returns_equal_fork():
    inputs = _inputs()
    model = peftfx.apply(M.gpt2(), LoRA(rank=2), inputs)
    folded = peftfx.fold(model)
    assert folded is not model and len(folded.graph.nodes) == len(model.graph.nodes)
    with torch.no_grad():
        assert torch.equal(folded(**inputs).logits, model(**inputs).logits)
    with pytest.raises(peftfx.PeftfxError, match="fold"):
        peftfx.fold(M.gpt2())


def test_folded_model_exports_with_dynamic_shapes():
    """torch.export (the ONNX exporter's front end) traces the folded graph; the exported program runs other
    batch and sequence sizes and matches the unfolded model."""
    inputs = _inputs()
    model = peftfx.apply(M.llama(), PTuning(num_virtual_tokens=4, encoder_hidden_size=16), inputs).eval()
    _randomise(model)
    folded = peftfx.fold(model)
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(folded, (), kwargs={**inputs, "use_cache": False}, strict=False,
                             dynamic_shapes={"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
                                             "use_cache": None})
    ids = M.ids(2, 13, seed=5)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        assert (ep.module()(**x, use_cache=False).logits - model(**x).logits).abs().max().item() < TOL
