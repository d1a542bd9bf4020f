"""The architecture sweep: every model type in the installed transformers (plus a diffusers UNet) that builds
from a tiny config, put through the product's whole path — roles, LoRA by role with Hugging Face PEFT parity,
merge, IA3's default, ONNX export verified in ONNX Runtime at a shape unlike the example.

``run(name)`` returns one row (a dict of check → outcome); ``tests/sweep/test_sweep.py`` asserts each row
against ``KNOWN`` (known gaps, each with its reason), and ``python -m tests.sweep.report`` writes the coverage
matrix (``bench/results/sweep.md``, copied into the README). Nothing downloads: every model is random-init.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# transformers model types whose CausalLM / Seq2SeqLM / MaskedLM / image-classification / CTC / speech class the
# sweep builds (the same shrink for all: see _tiny); grouped for the matrix
DECODERS = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "olmo", "olmo2",
            "opt", "bloom", "falcon", "gpt_neox", "gptj", "gpt_bigcode", "codegen", "stablelm", "starcoder2",
            "cohere", "granite", "persimmon", "biogpt", "xglm", "mpt", "helium", "glm", "exaone4", "seed_oss"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "jetmoe", "phimoe"]
ENCODERS = ["bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
            "camembert", "mpnet", "megatron-bert", "rembert", "nystromformer", "ernie", "roformer"]
SEQ2SEQ = ["t5", "bart", "mbart", "marian", "pegasus", "blenderbot", "m2m_100", "led", "mt5", "umt5"]
VISION = ["vit", "deit", "beit", "swin", "convnext", "resnet", "dinov2", "regnet"]
SPEECH = ["whisper", "wav2vec2", "hubert"]
OTHER = ["unet2d"]   # diffusers
CNN = {"convnext", "resnet", "regnet"}   # no attention: LoRA on every convolution instead of q/v
ALL = DECODERS + MOE + ENCODERS + SEQ2SEQ + VISION + SPEECH + OTHER
GROUP = {**{n: "decoder" for n in DECODERS}, **{n: "moe" for n in MOE}, **{n: "encoder" for n in ENCODERS},
         **{n: "encoder-decoder" for n in SEQ2SEQ}, **{n: "vision" for n in VISION},
         **{n: "speech" for n in SPEECH}, **{n: "diffusers" for n in OTHER}}

_INT = dict(hidden_size=32, d_model=32, n_embd=32, embed_dim=32, num_hidden_layers=2, n_layer=2, num_layers=2,
            n_layers=2, encoder_layers=2, decoder_layers=2, num_decoder_layers=2, num_attention_heads=4,
            n_head=4, n_heads=4, encoder_attention_heads=4, decoder_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, ffn_dim=64, encoder_ffn_dim=64, decoder_ffn_dim=64, d_ff=64, n_inner=64,
            vocab_size=128, max_position_embeddings=64, n_positions=64, head_dim=8, d_kv=8,
            num_local_experts=4, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            embedding_size=32, image_size=32, patch_size=8, num_labels=3, rotary_dim=8, partial_rotary_factor=0.5,
            max_source_positions=32, max_target_positions=32, num_mel_bins=16, attention_window=4,
            num_channels=3, ffn_hidden_size=64, kv_channels=8, classifier_proj_size=16)


def _tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING
    cfg = CONFIG_MAPPING[model_type]()
    for k, v in _INT.items():
        if k in ("partial_rotary_factor",) and not isinstance(getattr(cfg, k, None), float):
            continue
        if hasattr(cfg, k) and type(getattr(cfg, k)) in (int, float) and not isinstance(getattr(cfg, k), bool):
            try:
                setattr(cfg, k, v)
            except Exception:  # noqa: BLE001 — a validated field that refuses the value keeps its default
                pass
    if model_type in ("swin",):
        cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size = 16, [1, 1], [2, 2], 2
    if model_type in ("convnext", "regnet", "resnet"):
        for k, v in (("hidden_sizes", [8, 16]), ("depths", [1, 1]), ("embedding_size", 8)):
            if hasattr(cfg, k):
                setattr(cfg, k, v)
        if model_type == "resnet":
            cfg.layer_type = "basic"
        if model_type == "regnet":
            cfg.groups_width = 8
    if model_type in ("wav2vec2", "hubert"):
        cfg.conv_dim, cfg.conv_stride, cfg.conv_kernel = [8, 8], [5, 2], [10, 3]
        cfg.num_feat_extract_layers = 2
        cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups = 4, 2
    if model_type == "led":
        cfg.attention_window = [4, 4]
    return cfg


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    example: dict[str, torch.Tensor]          # traced with
    other: dict[str, torch.Tensor]            # another shape (batch, and each length different)


def _ids(b, n, vocab=100):
    g = torch.Generator().manual_seed(b * 100 + n)
    return torch.randint(3, vocab, (b, n), generator=g)


def build(name: str) -> Case:
    """The tiny model (eval, seeded) and its two example inputs."""
    torch.manual_seed(0)
    if name == "unet2d":
        from diffusers import UNet2DConditionModel
        m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=8,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4).eval()
        def ex(b, n): return {"sample": torch.randn(b, 4, 8, 8), "timestep": torch.tensor(3),
                              "encoder_hidden_states": torch.randn(b, n, 32)}
        return Case(name, m, ex(2, 5), ex(3, 7))
    import transformers as tf
    from transformers.models.auto import modeling_auto as ma
    cfg = _tiny_config(name)
    group = GROUP[name]
    if group in ("decoder", "moe"):
        m = tf.AutoModelForCausalLM.from_config(cfg)
        def ex(b, n): return {"input_ids": _ids(b, n)}
    elif group == "encoder":
        m = tf.AutoModelForMaskedLM.from_config(cfg) if name in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES \
            else tf.AutoModel.from_config(cfg)
        def ex(b, n): return {"input_ids": _ids(b, n), "attention_mask": torch.ones(b, n, dtype=torch.long)}
    elif group == "encoder-decoder":
        m = tf.AutoModelForSeq2SeqLM.from_config(cfg)
        def ex(b, n): return {"input_ids": _ids(b, n), "decoder_input_ids": _ids(b, max(2, n - 3))}
    elif group == "vision":
        m = tf.DeiTForImageClassification(cfg) if name == "deit" else \
            tf.AutoModelForImageClassification.from_config(cfg)     # (deit maps to two classes: the Auto call fails)
        def ex(b, n): return {"pixel_values": torch.randn(b, 3, 32, 32)}
    elif name == "whisper":
        m = tf.WhisperForConditionalGeneration(cfg)
        def ex(b, n): return {"input_features": torch.randn(b, 16, 64), "decoder_input_ids": _ids(b, n - 2)}
    else:  # CTC speech
        m = tf.AutoModelForCTC.from_config(cfg)
        def ex(b, n): return {"input_values": torch.randn(b, 400 + 40 * n)}
    return Case(name, m.eval(), ex(2, 8), ex(3, 6))


@dataclass
class Row:
    name: str
    group: str
    params: int = 0
    roles: str = ""
    checks: dict[str, str] = field(default_factory=dict)   # check → "ok" | "n/a: why" | "FAIL: why"
    seconds: float = 0.0


def _out(o: Any) -> torch.Tensor:
    """The first tensor of a model output (logits / sample / last_hidden_state)."""
    if isinstance(o, torch.Tensor):
        return o
    if hasattr(o, "to_tuple"):
        o = o.to_tuple()
    if isinstance(o, (tuple, list)):
        for x in o:
            t = _out(x)
            if t is not None:
                return t
    if isinstance(o, dict):
        return _out(tuple(o.values()))
    return None


def _close(a, b, tol) -> float:
    d = (a.float() - b.float()).abs().max().item()
    scale = max(1.0, b.float().abs().max().item())
    if not d <= tol * scale:
        raise AssertionError(f"max abs diff {d:.3g} > {tol:g} × {scale:.3g}")
    return d


def _randomise(peft) -> None:
    """Give every adapter parameter nonzero values (an untrained LoRA is the identity: parity would be vacuous)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "ia3" in n.lower() else 0.0))


def run(name: str, *, export: bool = True) -> Row:
    import peftfx
    from peftfx import IA3, LoRA, select
    row = Row(name, GROUP[name])
    t0 = time.perf_counter()

    def check(key: str, fn: Callable[[], str | None]) -> bool:
        try:
            r = fn()
            row.checks[key] = r or "ok"
            return True
        except Exception as e:  # noqa: BLE001 — the sweep records every failure with its reason
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:160]
            row.checks[key] = "FAIL: " + msg
            if os.environ.get("PEFTFX_SWEEP_DEBUG"):
                traceback.print_exc()
            return False

    st: dict[str, Any] = {}

    def _build():
        st["case"] = c = build(name)
        row.params = sum(p.numel() for p in c.model.parameters())
        with torch.no_grad():
            st["ref"] = _out(c.model(**c.example))
            st["ref2"] = _out(c.model(**c.other))
    if not check("build", _build):
        row.seconds = time.perf_counter() - t0
        return row
    case = st["case"]

    def _lora():
        targets = select.type("conv") if name in CNN else select.role("attn.q", "attn.v")
        rule = LoRA(rank=4, alpha=8, targets=targets)
        peft = peftfx.apply(copy.deepcopy(case.model), [rule], example_inputs=case.example)
        peft.eval()
        st["peft"] = peft
        with torch.no_grad():
            _close(_out(peft(**case.example)), st["ref"], 1e-5)      # untrained = base
        _randomise(peft)
        return None
    ok_lora = check("lora", _lora)

    def _roles_check():
        rep = peftfx.inspect(case.model, None, example_inputs=case.example)
        d = rep.to_dict()
        roles = {}
        for s in d.get("sites", []):
            for r in s.get("roles", []):
                roles[r] = roles.get(r, 0) + 1
        row.roles = " ".join(f"{k}:{v}" for k, v in sorted(roles.items()))
        need = set() if name in CNN else {"attn.q", "attn.v"}
        missing = [r for r in sorted(need) if r not in roles]
        if missing:
            raise AssertionError(f"roles {missing} not found")
        if not any(r.startswith("mlp.") for r in roles) and name not in CNN:
            raise AssertionError("no mlp.* role")
    check("roles", _roles_check)

    if ok_lora:
        def _hf():
            from peft import PeftModel as HFPeft
            peft = st["peft"]
            with tempfile.TemporaryDirectory() as d:
                try:
                    peftfx.save_adapter(peft, d, format="hf")
                except peftfx.PeftfxError as e:
                    return f"n/a: {str(e).splitlines()[0][:120]}"
                if name == "whisper":   # HF's SEQ_2_SEQ_LM wrapper passes input_ids, which Whisper has not: the base
                    import json         # PeftModel class (task_type None), as HF's own Whisper examples load it
                    cfg_path = os.path.join(d, "adapter_config.json")
                    cfg = json.load(open(cfg_path))
                    cfg["task_type"] = None
                    json.dump(cfg, open(cfg_path, "w"))
                hf = HFPeft.from_pretrained(copy.deepcopy(case.model), d).eval()
                n_hf = sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)
                n_fx = peftfx.trainable_parameters(peft)[0]
                if n_hf != n_fx:
                    raise AssertionError(f"trainable {n_fx} vs HF PEFT {n_hf}")
                with torch.no_grad():
                    _close(_out(peft(**case.example)), _out(hf(**case.example)), 1e-5)
                    _close(_out(peft(**case.other)), _out(hf(**case.other)), 1e-5)
        check("hf_parity", _hf)

        def _merge():
            peft = st["peft"]
            with torch.no_grad():
                before = _out(peft(**case.other))
                merged = peftfx.merge(peft)
                _close(_out(merged(**case.other)), before, 1e-4)
            st["merged"] = merged
        check("merge", _merge)

    def _ia3():
        rule = IA3(targets=select.type("conv")) if name in CNN else IA3()    # IA3's default is k, v and the FFN
        peft = peftfx.apply(copy.deepcopy(case.model), [rule], example_inputs=case.example)
        peft.eval()
        with torch.no_grad():
            _close(_out(peft(**case.example)), st["ref"], 1e-5)
            _randomise(peft)
            before = _out(peft(**case.other))
            _close(_out(peftfx.merge(peft)(**case.other)), before, 1e-4)
        n = sum(1 for _ in peft.adapter_modules().values()) if hasattr(peft, "adapter_modules") else 0
        return None if n else "ok"
    check("ia3", _ia3)

    if export and "merged" in st:
        def _onnx():
            from peftfx import Runtime
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "m.onnx")
                peftfx.export_onnx(st["peft"], path, case.example)
                import onnx
                mp = onnx.load(path, load_external_data=False)
                names = [i.name for i in mp.graph.input] + [o.name for o in mp.graph.output]
                if len(names) != len(set(names)):
                    raise AssertionError(f"input/output names not unique: {names}")
                rt = Runtime(path)
                feed = {k: v.numpy() for k, v in case.other.items() if k in rt.inputs}
                got = rt.run(feed)[rt.outputs[0]]
                with torch.no_grad():
                    want = _out(st["merged"](**case.other))
                _close(torch.as_tensor(got), want, 1e-4)
        check("onnx", _onnx)
    row.seconds = time.perf_counter() - t0
    return row
