"""Architectures off the decoder-only path: export that follows the trace (per-input dynamic axes, unique I/O names)
for BART, Whisper and a diffusers UNet, checked in ONNX Runtime on shapes unlike the example (≤ 1e-4); LoRA on
Wav2Vec2, ConvNeXt and ResNet against Hugging Face PEFT on the same weights (≤ 1e-5); the ``head`` role only on a
model's final output projection."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import peftfx
from peftfx import LoRA, select
from peftfx.export import Runtime, export_onnx

ORT_TOL = 1e-4      # ONNX Runtime vs PyTorch, float32
HF_TOL = 1e-5       # peftfx vs Hugging Face PEFT on the same weights


# ---------------------------------------------------------------------------------------------------- helpers
def _randomise_b(pm, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _hf(model, **config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(lora_dropout=0.0, **config))


def _copy_lora_from_hf(hf, ours, seed=7) -> int:
    """A random B for every HF LoRA layer (A is random already), both copied into ours by module path."""
    g, n = torch.Generator().manual_seed(seed), 0
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if "default" in getattr(mod, "lora_A", {}):
                b = mod.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
                ad = ours.get_submodule(name.replace("base_model.model.", "", 1) + ".lora")
                ad.lora_A.copy_(mod.lora_A["default"].weight.reshape(ad.lora_A.shape))
                ad.lora_B.copy_(b.reshape(ad.lora_B.shape))
                n += 1
    return n


def _names(path):
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in g.input], [o.name for o in g.output]


def _dims(path, name):
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    vi = next(v for v in list(g.input) + list(g.output) if v.name == name)
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _ids(b, s, vocab=64, seed=1):
    return torch.randint(3, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _run_ort(path, feeds):
    return Runtime(str(path)).run({k: v.numpy() for k, v in feeds.items()})


# ------------------------------------------------------------------------------------------- encoder-decoder
@pytest.fixture(scope="module")
def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    return BartForConditionalGeneration(cfg).eval()


def test_bart_export_gives_source_and_target_their_own_axes(bart, tmp_path):
    """One shared ``sequence`` axis made ONNX Runtime fail as soon as source and target lengths differed; the
    example here has equal lengths (the common case that hid it), the checks and the fresh run do not."""
    ex = {"input_ids": _ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long),
          "decoder_input_ids": _ids(2, 8, seed=2)}
    pm = peftfx.apply(bart, LoRA(rank=4, targets=select.role("attn.q", "attn.v")), ex)
    _randomise_b(pm)
    # optimize="none" in this file: the fusions are test_optimize.py's subject (and the sweep exports every
    # architecture at the default level); verification in ONNX Runtime still runs
    report = export_onnx(pm, tmp_path / "bart.onnx", ex, optimize="none")
    assert report.inputs == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                             "decoder_input_ids": ["batch", "decoder_sequence"]}
    assert report.outputs["logits"] == ["batch", "decoder_sequence", 64]
    assert report.outputs["encoder_last_hidden_state"] == ["batch", "sequence", 32]
    cases = {c["case"] for c in report.checks}
    assert {"batch 3 × seq 1 × decoder_sequence 2", "batch 3 × seq 16 × decoder_sequence 2"} <= cases
    assert report.max_abs < ORT_TOL and all(c["ok"] for c in report.checks)
    ins, outs = _names(report.path)
    assert len(set(ins + outs)) == len(ins + outs)
    x = {"input_ids": _ids(3, 11, seed=5), "attention_mask": torch.ones(3, 11, dtype=torch.long),
         "decoder_input_ids": _ids(3, 4, seed=6)}
    x["attention_mask"][1, 7:] = 0
    got = _run_ort(report.path, x)
    with torch.no_grad():
        ref = pm.eval()(**x)
        base = bart(**x).logits
    assert np.abs(got["logits"] - ref.logits.numpy()).max() < ORT_TOL
    assert np.abs(got["encoder_last_hidden_state"] - ref.encoder_last_hidden_state.numpy()).max() < ORT_TOL
    assert (ref.logits - base).abs().max() > 1e-3                           # the adapter acts


def test_whisper_mel_bins_stay_fixed_and_decoder_length_varies(tmp_path):
    """Whisper's ``input_features`` [batch, mel bins, frames]: the trace fixes mel bins (a conv's in-channels) and
    frames (the positional table); export used to declare dim 1 a dynamic ``sequence`` and fail."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    model = WhisperForConditionalGeneration(cfg).eval()
    ex = {"input_features": torch.randn(2, 80, 32), "decoder_input_ids": _ids(2, 4)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peftfx.apply(model, LoRA(rank=4), ex)
    assert not [w for w in caught if "SpecAugment" in str(w.message)]  # mask_time_prob 0.05, apply_spec_augment off
    _randomise_b(pm)
    report = export_onnx(pm, tmp_path / "whisper.onnx", ex, optimize="none")
    assert report.inputs == {"input_features": ["batch", 80, 32], "decoder_input_ids": ["batch", "decoder_sequence"]}
    assert _dims(report.path, "input_features")[1] == 80                      # static in the file
    assert report.max_abs < ORT_TOL and len(report.checks) == 6
    x = {"input_features": torch.randn(3, 80, 32, generator=torch.Generator().manual_seed(3)),
         "decoder_input_ids": _ids(3, 7, seed=4)}
    got = _run_ort(report.path, x)
    with torch.no_grad():
        ref = pm.eval()(**x).logits
        base = model(**x).logits
    assert np.abs(got["logits"] - ref.numpy()).max() < ORT_TOL
    assert (ref - base).abs().max() > 1e-3
    with pytest.raises(peftfx.ExportError, match="input_features"):           # a fixed size is checked
        Runtime(report.path).run(input_features=np.zeros((3, 64, 32), np.float32),
                                 decoder_input_ids=x["decoder_input_ids"].numpy())


# ------------------------------------------------------------------------------------------- diffusers UNet
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    ex = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([3, 7]),
          "encoder_hidden_states": torch.randn(2, 5, 32)}
    return model, ex


def test_unet_lora_by_role_matches_hf_peft_merges_and_exports(unet, tmp_path):
    model, ex = unet
    rules = LoRA(rank=4, alpha=8, targets=select.role("attn.q", "attn.k", "attn.v", "attn.o"))
    pm = peftfx.apply(copy.deepcopy(model), rules, ex)
    sites = {name[: -len(".lora")] for name, _ in pm.named_modules() if name.endswith(".lora")}
    want = {n for n, _ in model.named_modules() if n.endswith(ATTN)}
    assert sites == want and len(sites) == 32                     # self- and cross-attention, every block
    hf = _hf(copy.deepcopy(model), r=4, lora_alpha=8, target_modules=list(ATTN)).eval()
    assert _copy_lora_from_hf(hf, pm) == 32
    assert peftfx.trainable_parameters(pm)[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    with torch.no_grad():
        ref = hf(**ex).sample
        out = pm.eval()(**ex).sample
        base = model(**ex).sample
        assert (out - ref).abs().max() < HF_TOL and (out - base).abs().max() > 1e-3
        assert (peftfx.merge(pm)(**ex).sample - out).abs().max() < HF_TOL
    report = export_onnx(pm, tmp_path / "unet.onnx", ex, optimize="none")
    ins, outs = _names(report.path)
    assert ins == ["sample", "timestep", "encoder_hidden_states"] and outs == ["out_sample"]   # `sample` is an input
    assert report.inputs["sample"] == ["batch", 4, 8, 8]
    assert report.max_abs < ORT_TOL and all(c["ok"] for c in report.checks)
    g = torch.Generator().manual_seed(5)
    x = {"sample": torch.randn(3, 4, 8, 8, generator=g), "timestep": torch.tensor([1, 50, 999]),
         "encoder_hidden_states": torch.randn(3, 9, 32, generator=g)}
    got = _run_ort(report.path, x)["out_sample"]
    with torch.no_grad():
        assert np.abs(got - pm(**x).sample.numpy()).max() < ORT_TOL


def test_unet_head_is_only_the_final_output_projection(unet):
    model, ex = unet
    sites = peftfx.inspect(model, None, ex).plan.sites
    assert [s.key for s in sites if "head" in s.roles] == ["conv_out"]
    assert all(not s.roles for s in sites if s.key.endswith("proj_out"))


class _ToImage(nn.Module):
    """A transformer-style block whose ``proj_out`` feeds a transposed convolution (a weight peftfx cannot adapt)."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(8, 16)
        self.proj_out = nn.Linear(16, 16)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)

    def forward(self, x):
        h = self.proj_out(torch.relu(self.proj_in(x)))
        return self.up(h.reshape(x.shape[0], 4, 2, 2))


def test_projection_feeding_an_unadaptable_weight_is_no_head():
    sites = {s.key: s for s in peftfx.inspect(_ToImage(), None, (torch.randn(2, 8),)).plan.sites}
    assert "head" not in sites["proj_out"].roles and "up" not in sites


# ------------------------------------------------------------------------------------------ tracing fixes
def _wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                         num_conv_pos_embedding_groups=2, vocab_size=32, mask_time_length=2)
    return Wav2Vec2Model(cfg)        # layerdrop 0.1 and mask_time_prob 0.05 by default: LayerDrop and SpecAugment


def test_wav2vec2_applies_without_host_randomness_and_matches_hf_peft():
    """LayerDrop (``if torch.rand([]) < p``) failed torch.export on a data-dependent guard; it and SpecAugment's
    numpy masks are off in the traced training graph (warned, config restored); masks passed as input still act."""
    model = _wav2vec2()
    x = torch.randn(2, 400, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"layerdrop=0\.1, mask_time_prob=0\.05.*mask_time_indices"):
        pm = peftfx.apply(copy.deepcopy(model), LoRA(rank=4), {"input_values": x})
    assert (model.config.layerdrop, model.config.mask_time_prob) == (0.1, 0.05)        # restored
    hf = _hf(copy.deepcopy(model), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).eval()
    assert _copy_lora_from_hf(hf, pm) == 4
    mask = torch.zeros(2, 39, dtype=torch.bool)
    mask[:, 3:7] = True
    with torch.no_grad():
        pm.eval()
        out = pm(input_values=x).last_hidden_state
        assert (out - hf(input_values=x).last_hidden_state).abs().max() < HF_TOL
        assert (out - model.eval()(input_values=x).last_hidden_state).abs().max() > 1e-3
        masked = pm(input_values=x, mask_time_indices=mask).last_hidden_state
        assert (masked - hf(input_values=x, mask_time_indices=mask).last_hidden_state).abs().max() < HF_TOL
        assert (masked - out).abs().max() > 1e-3
        pad = torch.ones(2, 400, dtype=torch.long)
        pad[1, 250:] = 0                               # the feature extractor's padding mask, another signature
        padded = pm(input_values=x, attention_mask=pad).last_hidden_state
        assert (padded - hf(input_values=x, attention_mask=pad).last_hidden_state).abs().max() < HF_TOL
    pm.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm(input_values=x).last_hidden_state.square().mean().backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert grads and all(".lora." in n for n in grads)


def test_convnext_lora_matches_hf_peft_and_trains():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32,
                         drop_path_rate=0.1, num_labels=3, layer_scale_init_value=1.0)
    model = ConvNextForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pm = peftfx.apply(copy.deepcopy(model), LoRA(rank=4, targets=select.name("pwconv1", "pwconv2")),
                      {"pixel_values": x})
    hf = _hf(copy.deepcopy(model), r=4, lora_alpha=8, target_modules=["pwconv1", "pwconv2"]).eval()
    assert _copy_lora_from_hf(hf, pm) == 4
    with torch.no_grad():
        out = pm.eval()(pixel_values=x).logits
        assert (out - hf(pixel_values=x).logits).abs().max() < HF_TOL
        assert (out - model(pixel_values=x).logits).abs().max() > 1e-4
    pm.train()
    pm(pixel_values=x, labels=torch.tensor([0, 2])).loss.backward()      # another signature, train mode
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert len(grads) == 8 and all(".lora." in n for n in grads)


def test_resnet_lora_on_convs_matches_hf_peft_in_eval_and_train():
    """Convolutions + BatchNorm: LoRA on every conv equals HF PEFT in eval (running statistics) and in train mode
    (batch statistics, outputs and LoRA gradients)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=3)
    model = ResNetForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pm = peftfx.apply(copy.deepcopy(model), LoRA(rank=2, alpha=4, targets=select.type("Conv2d")),
                      {"pixel_values": x})
    hf = _hf(copy.deepcopy(model), r=2, lora_alpha=4, target_modules=["convolution"]).eval()
    n = _copy_lora_from_hf(hf, pm)
    assert n == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 6
    assert peftfx.trainable_parameters(pm)[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    with torch.no_grad():
        out = pm.eval()(pixel_values=x).logits
        assert (out - hf(pixel_values=x).logits).abs().max() < HF_TOL
        assert (out - model(pixel_values=x).logits).abs().max() > 1e-4
    pm.train()
    hf.train()
    out, ref = pm(pixel_values=x).logits, hf(pixel_values=x).logits
    assert (out - ref).abs().max() < HF_TOL
    out.square().sum().backward()
    ref.square().sum().backward()
    for name, mod in hf.named_modules():
        if "default" in getattr(mod, "lora_A", {}):
            ours = pm.get_submodule(name.replace("base_model.model.", "", 1) + ".lora")
            pairs = ((ours.lora_A, mod.lora_A["default"].weight), (ours.lora_B, mod.lora_B["default"].weight))
            for mine, theirs in pairs:
                assert (mine.grad - theirs.grad.reshape(mine.shape)).abs().max() < HF_TOL
    stats = "resnet.embedder.embedder.normalization.running_mean"
    assert torch.allclose(pm.get_buffer(stats), hf.get_buffer("base_model.model." + stats), atol=HF_TOL)
