"""Hugging Face PEFT folders both ways: folders made by the peft package load into peftfx with HF's outputs,
folders peftfx writes load in ``peft.PeftModel.from_pretrained`` with peftfx's outputs, and every config field
that cannot be honoured is named in the error."""
from __future__ import annotations

import json

import pytest
import torch

import peftfx
from peftfx import CheckpointError, select
from tests import models as M

TOL = 1e-5  # float32


def _hf_folder(arch, config, path, scale=0.2):
    """An HF PEFT folder written by ``peft`` itself; every trainable tensor (LoRA B included) perturbed."""
    from peft import get_peft_model

    hf = get_peft_model(getattr(M, arch)(), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    hf.save_pretrained(str(path))
    return hf.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _from_pretrained(arch, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(getattr(M, arch)(), str(path)).eval()


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, **kw})


CASES = {
    "gpt2-conv1d-embedding": ("gpt2", lambda: _lora(target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True)),
    "llama-patterns-rslora-layers": ("llama", lambda: _lora(
        target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3},
        use_rslora=True, layers_to_transform=[1])),
    "llama-regex-exclude": ("llama", lambda: _lora(target_modules=r".*\.(q_proj|gate_proj)",
                                                   exclude_modules=["model.layers.0.mlp.gate_proj"])),
    "llama-dora": ("llama", lambda: _lora(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "bert": ("bert", lambda: _lora(target_modules=["query", "value", "dense"], lora_alpha=16)),
    "llama-ia3": ("llama", lambda: __import__("peft").IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                feedforward_modules=["down_proj"])),
    "gpt2-ia3": ("gpt2", lambda: __import__("peft").IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                              feedforward_modules=["mlp.c_proj"],
                                                              fan_in_fan_out=True)),
    "llama-vera": ("llama", lambda: __import__("peft").VeraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                                  projection_prng_key=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_folder_loads_with_hf_outputs_and_saves_back(case, tmp_path):
    arch, config = CASES[case]
    ids = M.ids()
    hf = _hf_folder(arch, config(), tmp_path / "hf")
    ref, base = _logits(hf, ids), _logits(getattr(M, arch)(), ids)
    assert (ref - base).abs().max().item() > 1e-2                      # the adapter changes the output
    ours = peftfx.load_adapter(getattr(M, arch)(), tmp_path / "hf", {"input_ids": ids}).eval()
    assert (_logits(ours, ids) - ref).abs().max().item() < TOL
    # ... and back: peftfx writes an HF folder that peft loads with the same outputs
    peftfx.save_adapter(ours, tmp_path / "back", format="hf")
    again = _from_pretrained(arch, tmp_path / "back")
    assert (_logits(again, ids) - ref).abs().max().item() < TOL


def _virtual(kind, task, n):
    import peft

    return {"prompt": lambda: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n),
            "ptuning": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n, encoder_hidden_size=32),
            "ptuning-lstm": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n,
                                                             encoder_reparameterization_type="LSTM"),
            "prefix": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=n),
            "prefix-projection": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=n,
                                                                 prefix_projection=True, encoder_hidden_size=32),
            }[kind]()


@pytest.mark.parametrize("kind,arch,task", [
    ("prompt", "llama", "CAUSAL_LM"), ("prompt", "bert", "FEATURE_EXTRACTION"), ("ptuning", "llama", "CAUSAL_LM"),
    ("ptuning-lstm", "gpt2", "CAUSAL_LM"), ("prefix", "llama", "CAUSAL_LM"), ("prefix-projection", "gpt2", "CAUSAL_LM"),
])
def test_virtual_token_folders_both_ways(kind, arch, task, tmp_path):
    """HF returns N + S logits for a prompt on a causal LM, peftfx the S real ones: compare ``hf[:, N:]``.
    HF stores p-tuning / projected prefixes as the encoder's output and loads them as tables (inference mode)."""
    n, ids = 5, M.ids()
    _hf_folder(arch, _virtual(kind, task, n), tmp_path / "hf")
    real = (lambda t: t[:, n:]) if task == "CAUSAL_LM" and not kind.startswith("prefix") else (lambda t: t)
    ref = real(_logits(_from_pretrained(arch, tmp_path / "hf"), ids))
    assert (ref - _logits(getattr(M, arch)(), ids)).abs().max().item() > 1e-2
    ours = peftfx.load_adapter(getattr(M, arch)(), tmp_path / "hf", {"input_ids": ids}).eval()
    assert (_logits(ours, ids) - ref).abs().max().item() < TOL
    peftfx.save_adapter(ours, tmp_path / "back", format="hf")
    assert (real(_logits(_from_pretrained(arch, tmp_path / "back"), ids)) - ref).abs().max().item() < TOL


@pytest.mark.parametrize("rule", [
    lambda: __import__("peftfx.methods.ptuning", fromlist=["x"]).PTuning(num_virtual_tokens=4, encoder_hidden_size=16),
    lambda: __import__("peftfx.methods.prefix", fromlist=["x"]).PrefixTuning(num_virtual_tokens=4, projection=True,
                                                                             encoder_hidden_size=16),
])
def test_peftfx_encoders_save_as_hf_tables(rule, tmp_path):
    """A peftfx p-tuning / projected prefix is written as its encoder's output, as HF PEFT writes its own."""
    rule, ids = rule(), M.ids()
    pm = peftfx.apply(M.llama(), rule, {"input_ids": ids}).eval()
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    peftfx.save_adapter(pm, tmp_path / "hf", format="hf")
    hf = _logits(_from_pretrained("llama", tmp_path / "hf"), ids)
    hf = hf if rule.name == "prefix" else hf[:, rule.num_virtual_tokens:]
    assert (hf - _logits(pm, ids)).abs().max().item() < TOL
    assert (hf - _logits(M.llama(), ids)).abs().max().item() > 1e-2


def test_lora_rules_translate_target_modules_to_name_selectors(tmp_path):
    _hf_folder("llama", _lora(target_modules=["q_proj", "v_proj"], layers_to_transform=1), tmp_path / "hf")
    pm = peftfx.load_adapter(M.llama(), tmp_path / "hf", {"input_ids": M.ids()})
    (rule,) = pm.peft_info.rules
    assert rule.selector == select.name("q_proj", "v_proj") & select.layer(1) or \
        rule.selector == select.name("v_proj", "q_proj") & select.layer(1)
    assert sorted(pm.peft_info.adapters) == ["model.layers.1.self_attn.q_proj.lora",
                                             "model.layers.1.self_attn.v_proj.lora"]


def test_peftfx_adapter_saves_as_hf_with_mixed_ranks_and_scalings(tmp_path):
    """Three rules (different rank, alpha, rsLoRA) → one HF config with rank/alpha patterns."""
    from peft import LoraConfig  # noqa: F401  (peft must be importable for the reference)

    ids = M.ids()
    rules = [peftfx.LoRA(rank=4, alpha=8, targets=select.role("attn.q")),
             peftfx.LoRA(rank=2, alpha=8, rslora=True, targets=select.role("attn.v")),
             peftfx.LoRA(rank=4, alpha=3, targets=select.role("mlp.down") | select.role("embed"))]
    pm = peftfx.apply(M.llama(), rules, {"input_ids": ids}).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peftfx.save_adapter(pm, tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["rank_pattern"]
    hf = _from_pretrained("llama", tmp_path / "hf")
    assert (_logits(hf, ids) - _logits(pm, ids)).abs().max().item() < TOL
    assert (_logits(hf, ids) - _logits(M.llama(), ids)).abs().max().item() > 1e-2
    # the peftfx format is still the default and still loads
    peftfx.save_adapter(pm, tmp_path / "fx")
    back = peftfx.load_adapter(M.llama(), tmp_path / "fx", {"input_ids": ids}).eval()
    assert (_logits(back, ids) - _logits(pm, ids)).abs().max().item() < TOL


@pytest.mark.filterwarnings("ignore:Adapter 'default'")
@pytest.mark.parametrize("field,value,kw", [
    ("bias", "all", {"bias": "all"}),
    ("lora_bias", "True", {"lora_bias": True}),
])
def test_unsupported_hf_fields_are_named(tmp_path, field, value, kw):
    _hf_folder("bert", _lora(target_modules=["query", "value"], **kw), tmp_path / "hf")
    model = M.bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=field) as err:
        peftfx.load_adapter(model, tmp_path / "hf", {"input_ids": M.ids()})
    assert value in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_base_changing_init_and_unknown_fields_are_refused(tmp_path):
    _hf_folder("llama", _lora(target_modules=["q_proj"]), tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "adapter_config.json"
    original = json.loads(cfg_path.read_text())
    for patch, needle in (({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
                          ({"some_future_option": 3}, "some_future_option=3"),
                          ({"peft_type": "BOFT"}, "BOFT")):
        cfg_path.write_text(json.dumps({**original, **patch}))
        with pytest.raises(CheckpointError, match=needle.replace("(", r"\(")):
            peftfx.load_adapter(M.llama(), tmp_path / "hf", {"input_ids": M.ids()})


def test_mismatched_model_and_pickle_only_folder_are_refused(tmp_path):
    _hf_folder("llama", _lora(target_modules=["q_proj", "v_proj"]), tmp_path / "hf")
    with pytest.raises((CheckpointError, peftfx.NoMatchError)):
        peftfx.load_adapter(M.gpt2(), tmp_path / "hf", {"input_ids": M.ids()})
    with pytest.raises(CheckpointError, match="shape"):                    # same names, other sizes
        peftfx.load_adapter(M.llama(hidden=32, heads=2, kv_heads=1), tmp_path / "hf", {"input_ids": M.ids()})
    (tmp_path / "hf" / "adapter_model.safetensors").rename(tmp_path / "hf" / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        peftfx.load_adapter(M.llama(), tmp_path / "hf", {"input_ids": M.ids()})


def test_hf_save_refuses_what_hf_cannot_express(tmp_path):
    ids = M.ids()
    split = peftfx.apply(M.gpt2(), peftfx.LoRA(rank=2, fused="split", targets=select.role("attn.q", "attn.v")),
                         {"input_ids": ids})
    with pytest.raises(CheckpointError, match="fused='split'"):
        peftfx.save_adapter(split, tmp_path / "a", format="hf")
    mixed = peftfx.apply(M.llama(), [peftfx.LoRA(rank=2), peftfx.IA3()], {"input_ids": ids})
    with pytest.raises(CheckpointError, match="one peft_type"):
        peftfx.save_adapter(mixed, tmp_path / "b", format="hf")
    tiny = peftfx.apply(M.TinyTransformer(), peftfx.LoRA(rank=2, targets=select.role("attn.qkv")),
                        {"ids": torch.randint(0, 100, (2, 8))})
    with pytest.raises(CheckpointError, match="HF PEFT"):
        peftfx.save_adapter(tiny, tmp_path / "c", format="hf")
    with pytest.raises(CheckpointError, match="format"):
        peftfx.save_adapter(mixed, tmp_path / "d", format="onnx")
    assert not any(p.name in ("a", "b", "c", "d") for p in tmp_path.iterdir())
