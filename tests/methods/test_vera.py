"""VeRA: the shared projection equals Hugging Face PEFT's for the same key, output and gradient parity with
HF PEFT, merge == unmerged, unmerge restores, frozen shared matrices, vectors-only checkpoints."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx import VeRA, select
from tests import models as M

TOL = 1e-5  # float32


def _pair(arch, targets, rank=8, key=7):
    """(HF PEFT VeRA model, peftfx VeRA model) on copies of one base; HF's vectors get random values that
    are copied into ours. The shared A/B are *not* copied: they must already be equal."""
    from peft import VeraConfig, get_peft_model

    ids = M.ids()
    hf = get_peft_model(getattr(M, arch)(), VeraConfig(r=rank, target_modules=targets, projection_prng_key=key,
                                                       fan_in_fan_out=arch == "gpt2"))
    ours = peftfx.apply(getattr(M, arch)(), VeRA(rank=rank, projection_prng_key=key,
                                                 targets=select.name(*targets)), {"input_ids": ids})
    hp = dict(hf.named_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ours.peft_info.adapters:
            mod, pre = ours.get_submodule(name), "base_model.model." + name[: -len(".vera")] + "."
            for p in ("vera_lambda_b", "vera_lambda_d"):
                hp[pre + p + ".default"].copy_(torch.randn(getattr(mod, p).shape, generator=g))
                getattr(mod, p).copy_(hp[pre + p + ".default"])
    return hf.eval(), ours.eval(), ids


@pytest.mark.parametrize("arch,targets", [
    ("llama", ["q_proj", "v_proj"]),                    # v_proj is [32, 64]: uses the top-left slice
    ("llama", ["q_proj", "k_proj", "up_proj", "down_proj"]),
    ("gpt2", ["c_attn", "c_proj"]),                     # Conv1D; shared pair sized [r, 256] / [192, r]
])
def test_projection_and_outputs_match_hf_peft(arch, targets):
    hf, ours, ids = _pair(arch, targets)
    proj = next(iter(ours.adapter_modules().values())).projection
    hf_bufs = dict(hf.named_buffers())
    hf_a = next(v for k, v in hf_bufs.items() if k.endswith("vera_A.default"))
    hf_b = next(v for k, v in hf_bufs.items() if k.endswith("vera_B.default"))
    assert torch.equal(proj.vera_A, hf_a) and torch.equal(proj.vera_B, hf_b)
    assert all(m.projection is proj for m in ours.adapter_modules().values())      # one shared pair
    with torch.no_grad():
        ref, out = hf(input_ids=ids).logits, ours(input_ids=ids).logits
        base = getattr(M, arch)()(input_ids=ids).logits
    assert (ref - base).abs().max().item() > 1e-2
    assert (out - ref).abs().max().item() < TOL


def test_gradients_match_hf_peft_and_projection_is_frozen():
    hf, ours, ids = _pair("llama", ["q_proj", "v_proj"])
    hf(input_ids=ids).logits.square().mean().backward()
    ours(input_ids=ids).logits.square().mean().backward()
    hp = dict(hf.named_parameters())
    for name, mod in ours.adapter_modules().items():
        pre = "base_model.model." + name[: -len(".vera")] + "."
        for p in ("vera_lambda_b", "vera_lambda_d"):
            ref = hp[pre + p + ".default"].grad
            assert (getattr(mod, p).grad - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    trainable = {n.rsplit(".", 1)[-1] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}
    assert not any("vera_A" in k or "vera_B" in k for k in ours.state_dict())       # non-persistent buffers


def test_untrained_is_identity():
    model, ids = M.llama(), M.ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    pm = peftfx.apply(model, VeRA(rank=16), {"input_ids": ids})
    with torch.no_grad():
        assert (pm(input_ids=ids).logits - ref).abs().max().item() < TOL


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn"])])
def test_merge_equals_unmerged_and_unmerge_restores(arch, targets):
    _, ours, ids = _pair(arch, targets)
    with torch.no_grad():
        out = ours(input_ids=ids).logits
    site = next(iter(ours.peft_info.adapters.values())).site["weight"]
    w0 = ours.get_parameter(site).detach().clone()
    merged = peftfx.merge(ours)
    assert not any(n.op == "call_module" for n in merged.graph.nodes)
    assert (merged.get_parameter(site) - w0).abs().max().item() > 1e-3
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - out).abs().max().item() < TOL
    restored = peftfx.unmerge(merged)
    assert (restored.get_parameter(site) - w0).abs().max().item() < 1e-6
    with torch.no_grad():
        assert (restored(input_ids=ids).logits - out).abs().max().item() < TOL


def test_checkpoint_holds_only_vectors_and_regenerates_projection(tmp_path):
    from safetensors.torch import load_file

    _, ours, ids = _pair("llama", ["q_proj", "v_proj"])
    peftfx.save_adapter(ours, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter.safetensors")))
    assert keys and all(k.endswith(("vera_lambda_b", "vera_lambda_d")) for k in keys)
    back = peftfx.load_adapter(M.llama(), tmp_path / "a", {"input_ids": ids}).eval()
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item() < TOL
    # a different key draws a different projection
    other = peftfx.apply(M.llama(), VeRA(rank=8, projection_prng_key=8, targets=select.name("q_proj", "v_proj")),
                         {"input_ids": ids})
    a = next(iter(ours.adapter_modules().values())).projection.vera_A
    assert not torch.equal(next(iter(other.adapter_modules().values())).projection.vera_A, a)


def test_bad_options_and_embedding_site_are_refused():
    with pytest.raises(peftfx.RuleError, match="rank"):
        VeRA(rank=0)
    with pytest.raises(peftfx.RuleError, match="projection_prng_key"):
        VeRA(projection_prng_key="seed")
    with pytest.raises(peftfx.NoMatchError, match="linear weights only"):
        peftfx.apply(M.llama(), VeRA(targets=select.role("embed")), {"input_ids": M.ids()})
