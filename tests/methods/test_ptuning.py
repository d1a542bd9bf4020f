"""P-tuning: parity with Hugging Face PEFT's PromptEncoder (MLP and LSTM; same base, encoder copied across;
HF returns N + S logits for a causal LM, so HF's [:, N:] is compared), options against HF prompt tuning fed
the encoder's output, checkpoints, training, bad input."""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx import PTuning
from tests import models as M

TOL = 1e-5  # float32
N = 4


def _inputs():
    ids = M.ids(3, 10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _copy_encoder(hf, module) -> None:
    """Perturb HF's encoder (so no tensor is left at its init), then copy it: HF ``embedding.weight``/
    ``mlp_head``/``lstm_head`` → peftfx ``ptuning_embedding``/``ptuning_mlp``/``ptuning_lstm``."""
    g = torch.Generator().manual_seed(5)
    enc = hf.prompt_encoder.default
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    module.load_state_dict({k.replace("embedding.weight", "ptuning_embedding").replace("mlp_head", "ptuning_mlp")
                            .replace("lstm_head", "ptuning_lstm"): v for k, v in enc.state_dict().items()})


@pytest.mark.parametrize("arch,encoder", [("gpt2", "mlp"), ("llama", "lstm")])
def test_parity_with_hf_peft(arch, encoder):
    from peft import PromptEncoderConfig, get_peft_model

    base = getattr(M, arch)()
    inputs = _inputs()
    ours = peftfx.apply(copy.deepcopy(base), PTuning(num_virtual_tokens=N, encoder=encoder, encoder_hidden_size=32),
                        inputs)
    key = "transformer.wte.ptuning" if arch == "gpt2" else "model.embed_tokens.ptuning"
    assert list(ours.peft_info.adapters) == [key]
    hf = get_peft_model(copy.deepcopy(base), PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=32,
        encoder_reparameterization_type=encoder.upper()))
    _copy_encoder(hf, ours.get_submodule(key))
    assert peftfx.trainable_parameters(ours)[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    with torch.no_grad():
        a, b = hf(**inputs).logits, ours(**inputs).logits
    assert b.shape == base(**inputs).logits.shape
    assert (a[:, N:] - b).abs().max().item() < TOL


def test_options_against_prompt_tuning_reference():
    """token_dim ≠ model width and a narrow encoder: the virtual tokens are f(E_p); HF prompt tuning given exactly
    those tokens is the reference. Parameter count: N·e + (e·h + h) + (h·h + h) + (h·d + d)."""
    from peft import PromptTuningConfig, get_peft_model

    base = M.llama()
    inputs = _inputs()
    ours = peftfx.apply(copy.deepcopy(base), PTuning(num_virtual_tokens=N, token_dim=16, encoder_hidden_size=8),
                        inputs)
    e, h, d = 16, 8, 64
    assert peftfx.trainable_parameters(ours)[0] == N * e + (e * h + h) + (h * h + h) + (h * d + d)
    enc = ours.get_submodule("model.embed_tokens.ptuning")
    hf = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        hf.prompt_encoder.default.embedding.weight.copy_(enc())
        assert (hf(**inputs).logits[:, N:] - ours(**inputs).logits).abs().max().item() < TOL


def test_checkpoint_round_trip(tmp_path):
    base = M.gpt2()
    inputs = _inputs()
    ours = peftfx.apply(copy.deepcopy(base), PTuning(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=16),
                        inputs)
    with torch.no_grad():
        for p in ours.get_submodule("transformer.wte.ptuning").parameters():
            p.add_(0.01)
        ref = ours(**inputs).logits
    peftfx.save_adapter(ours, tmp_path / "pt")
    back = peftfx.load_adapter(copy.deepcopy(base), tmp_path / "pt", inputs)
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, ref)
    assert peftfx.trainable_parameters(back) == peftfx.trainable_parameters(ours)


def test_training_lowers_loss():
    """Only the table and the encoder train; the frozen random Llama's predictions move towards token 7."""
    ids = M.ids(4, 12)
    labels = torch.full_like(ids, 7)
    ours = peftfx.apply(M.llama(), PTuning(num_virtual_tokens=N), {"input_ids": ids, "labels": labels})
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.embed_tokens.ptuning.ptuning_") for n in trainable)
    before, after = M.train_with_labels(ours, ids, labels, steps=20)
    assert after < before - 0.15, (before, after)


def test_bad_options():
    with pytest.raises(peftfx.RuleError, match="encoder must be"):
        PTuning(encoder="gru")
    with pytest.raises(peftfx.RuleError, match="encoder_hidden_size"):
        PTuning(encoder_hidden_size=0)
    with pytest.raises(peftfx.RuleError, match="encoder_dropout"):
        PTuning(encoder_dropout=1.0)
