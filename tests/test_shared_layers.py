"""Shared layers (ALBERT: one layer module called N times): one site per weight, one adapter applied at every
call — Hugging Face PEFT's semantics — so trainable counts, outputs and checkpoint keys match HF PEFT's; merge
folds the adapter into the shared weight once."""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx import IA3, LoRA, select
from peftfx.roles import assign_roles
from peftfx.sites import find_sites
from tests.methods.test_lora import _randomise_and_copy

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

TOL = 1e-5   # float32


def _albert(layers=3):
    cfg = transformers.AlbertConfig(vocab_size=128, embedding_size=32, hidden_size=64, num_hidden_layers=layers,
                                    num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    return transformers.AlbertModel(cfg).eval()


def _ids():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def test_shared_module_is_one_site_with_every_call():
    pm = peftfx.trace(_albert(layers=3), {"input_ids": _ids()})
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    by_key = {s.key: s for s in sites}
    q = by_key["encoder.albert_layer_groups.0.albert_layers.0.attention.query"]
    assert len(q.nodes) == 3 and q.roles == {"attn.q"}                     # called once per hidden layer
    assert by_key["encoder.albert_layer_groups.0.albert_layers.0.ffn"].roles == {"mlp.up"}
    assert by_key["encoder.albert_layer_groups.0.albert_layers.0.ffn_output"].roles == {"mlp.down"}
    assert not any("#" in k or k.endswith(".weight") for k in by_key)


def test_lora_on_shared_layer_matches_hf_peft_and_merges_once():
    from peft import LoraConfig, get_peft_model

    base, ids = _albert(layers=3), _ids()
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8), {"input_ids": ids})   # default: attn.q, attn.v
    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    assert _randomise_and_copy(hf, ours) == len(ours.peft_info.adapters) == 2
    hf_train = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert peftfx.trainable_parameters(ours)[0] == hf_train == 2 * 4 * (64 + 64)
    # the one adapter runs at each of the three calls
    calls = [n for n in ours.graph.nodes if n.op == "call_module" and n.target.endswith("query.lora")]
    assert len(calls) == 3
    with torch.no_grad():
        a = hf(input_ids=ids).last_hidden_state
        b = ours(input_ids=ids).last_hidden_state
    assert (a - b).abs().max().item() < TOL
    merged = peftfx.merge(ours)
    assert not any(n.op == "call_module" and "lora" in str(n.target) for n in merged.graph.nodes)
    w = merged.get_parameter("encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight")
    w0 = base.encoder.albert_layer_groups[0].albert_layers[0].attention.query.weight
    ad = ours.get_submodule("encoder.albert_layer_groups.0.albert_layers.0.attention.query.lora")
    assert (w - (w0 + ad.delta())).abs().max().item() < 1e-6                     # folded once, not three times
    with torch.no_grad():
        assert (merged(input_ids=ids).last_hidden_state - a).abs().max().item() < TOL
    back = peftfx.unmerge(merged)
    with torch.no_grad():
        assert (back(input_ids=ids).last_hidden_state - a).abs().max().item() < TOL


def test_hf_folder_round_trip_on_shared_layer(tmp_path):
    from peft import PeftModel

    base, ids = _albert(layers=2), _ids()
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8), {"input_ids": ids})
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        want = ours(input_ids=ids).last_hidden_state
    peftfx.save_adapter(ours, tmp_path / "hf", format="hf")
    hf = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "hf").eval()
    with torch.no_grad():
        got = hf(input_ids=ids).last_hidden_state
    assert (got - want).abs().max().item() < TOL


def test_ia3_default_on_shared_layer_matches_hf_peft():
    from peft import IA3Config, get_peft_model

    base, ids = _albert(layers=2), _ids()
    ours = peftfx.apply(copy.deepcopy(base), IA3(), {"input_ids": ids})      # attn.k, attn.v, mlp.down
    hf = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["key", "value", "ffn_output"],
                                                       feedforward_modules=["ffn_output"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if hasattr(mod, "ia3_l") and "default" in getattr(mod, "ia3_l", {}):
                v = 1 + 0.2 * torch.randn(mod.ia3_l["default"].shape, generator=g)
                mod.ia3_l["default"].copy_(v)
                ours.get_submodule(name.replace("base_model.model.", "", 1) + ".ia3").ia3_l.copy_(v.flatten())
    assert peftfx.trainable_parameters(ours)[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    with torch.no_grad():
        a = hf(input_ids=ids).last_hidden_state
        assert (ours(input_ids=ids).last_hidden_state - a).abs().max().item() < TOL
        assert (peftfx.merge(ours)(input_ids=ids).last_hidden_state - a).abs().max().item() < TOL


def test_selecting_a_shared_layer_by_layer_index_takes_the_whole_site():
    # a site with several calls is one adapter; rules by role still see it
    base, ids = _albert(layers=2), _ids()
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=2, targets=select.role("mlp.*")), {"input_ids": ids})
    assert sorted(ours.peft_info.adapters) == ["encoder.albert_layer_groups.0.albert_layers.0.ffn.lora",
                                               "encoder.albert_layer_groups.0.albert_layers.0.ffn_output.lora"]


def test_shared_adapter_gradients_sum_over_calls_like_hf_peft():
    from peft import LoraConfig, get_peft_model

    base, ids = _albert(layers=3), _ids()
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8), {"input_ids": ids})
    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    _randomise_and_copy(hf, ours)
    ours.train()
    hf.train()                                   # ALBERT's dropouts are 0 by default: train mode is deterministic
    ours(input_ids=ids).last_hidden_state.square().mean().backward()
    hf(input_ids=ids).last_hidden_state.square().mean().backward()
    n = 0
    for name, mod in hf.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            ad = ours.get_submodule(name.replace("base_model.model.", "", 1) + ".lora")
            assert (ad.lora_A.grad - mod.lora_A["default"].weight.grad).abs().max().item() < 1e-6
            assert (ad.lora_B.grad - mod.lora_B["default"].weight.grad).abs().max().item() < 1e-6
            n += 1
    assert n == 2


def test_shared_layer_houlsby_exports_to_onnx(tmp_path):
    # a non-mergeable adapter stays in the graph at every call of the shared layer; ONNX Runtime agrees
    import numpy as np
    import onnxruntime as ort

    base, ids = _albert(layers=2), _ids()
    ours = peftfx.apply(copy.deepcopy(base), peftfx.Houlsby(bottleneck=8, targets=select.role("attn.o")),
                        {"input_ids": ids})
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    calls = [n for n in ours.graph.nodes if n.op == "call_module" and "adapter" in n.meta.get("peftfx", {})]
    assert len(calls) == 2 and len(ours.peft_info.adapters) == 1
    ours.eval()
    # optimize="none": the fusions are tests/export/test_optimize.py's subject; verification in ORT still runs
    report = peftfx.export_onnx(ours, tmp_path / "m.onnx", {"input_ids": ids}, optimize="none")
    assert report.max_abs < 1e-4
    x = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i in sess.get_inputs() if i.name == "input_ids"}
    got = sess.run(None, feed)[0]
    with torch.no_grad():
        want = ours(input_ids=x).last_hidden_state.numpy()
    assert np.abs(got - want).max() < 1e-4


def test_named_adapters_and_mixed_batches_on_a_shared_layer():
    base = _albert(layers=2)
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(4))
    peft = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8), {"input_ids": ids})
    peftfx.add_adapter(peft, "other", LoRA(rank=2, alpha=4, targets=select.role("attn.q", "mlp.down")))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    single = {}
    with torch.no_grad():
        for a in ("default", "other"):
            peftfx.set_active(peft, a)
            single[a] = peft(input_ids=ids).last_hidden_state
        peftfx.set_active(peft, None)
        single[None] = peft(input_ids=ids).last_hidden_state
        assert (single[None] - base(input_ids=ids).last_hidden_state).abs().max().item() < TOL
        assert (single["default"] - single["other"]).abs().max().item() > 1e-4
        out = peftfx.forward_mixed(peft, ["other", None, "default"], input_ids=ids).last_hidden_state
    for b, a in enumerate(["other", None, "default"]):
        assert (out[b] - single[a][b]).abs().max().item() < TOL
