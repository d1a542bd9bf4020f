"""DoRA and VeRA: peftfx vs Hugging Face PEFT side by side in one process.

    python bench/bench_dora_vera.py [--repeats 10] [--threads 2]

Model: Llama-shaped, 4 layers, hidden 512 (intermediate 1376, 8 heads, vocab 8192), float32 on CPU. Both
methods on every projection of the blocks (q, k, v, o, gate, up, down): DoRA rank 16 / alpha 32, VeRA rank 256.
Reported per method: trainable parameters (ours / HF), train-step time at batch 4 × 128 with AdamW (ours / HF;
≤ 1.0 means peftfx is as fast or faster) and inference latency at batch 1 × 128 unmerged (ours / HF) and merged
(peftfx only). Both sides start from the same base weights and equal adapter values. Timings are medians of
interleaved repeats; results go to bench/results/dora_vera.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import interleaved, write  # noqa: E402
from bench._common import infer as _infer, train_step as _step, trainable as _trainable  # noqa: E402
from bench._common import llama as _llama  # noqa: E402


def llama():
    return _llama(vocab_size=8192)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pair(method: str, ids):
    """(ours, HF) with equal adapter values (our tensors copied from HF's, keyed by module path)."""
    import peft

    import peftfx

    if method == "dora":
        hf_cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=True)
        rule = peftfx.DoRA(rank=16, alpha=32, targets=peftfx.select.name(*TARGETS))
        names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                 "dora_magnitude": "lora_magnitude_vector.default.weight"}
    else:
        hf_cfg = peft.VeraConfig(r=256, target_modules=TARGETS)
        rule = peftfx.VeRA(rank=256, targets=peftfx.select.name(*TARGETS))
        names = {"vera_lambda_b": "vera_lambda_b.default", "vera_lambda_d": "vera_lambda_d.default"}
    hf = peft.get_peft_model(llama(), hf_cfg)
    ours = peftfx.apply(llama(), rule, {"input_ids": ids})
    hp = dict(hf.named_parameters())
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
        for name, mod in ours.adapter_modules().items():
            pre = "base_model.model." + name.rsplit(".", 1)[0] + "."
            for pname, hname in names.items():
                getattr(mod, pname).copy_(hp[pre + hname])
    with torch.no_grad():
        err = (ours.eval()(input_ids=ids[:1]).logits - hf.eval()(input_ids=ids[:1]).logits).abs().max().item()
    return ours, hf, err


def bench(repeats: int) -> dict:
    import peftfx

    g = torch.Generator().manual_seed(0)
    train_ids = torch.randint(0, 8192, (4, 128), generator=g)
    infer_ids = train_ids[:1]
    out = {}
    for method in ("dora", "vera"):
        ours, hf, err = _pair(method, train_ids)
        merged = peftfx.merge(ours)
        step = interleaved({"ours": _step(ours, train_ids), "hf": _step(hf, train_ids)}, repeats)
        lat = interleaved({"ours": _infer(ours, infer_ids), "hf": _infer(hf, infer_ids),
                           "ours_merged": _infer(merged, infer_ids)}, repeats)
        out[method] = {"parity_max_abs": err, "trainable": {"ours": _trainable(ours), "hf": _trainable(hf)},
                       "train_step_s": step, "train_ratio": step["ours"] / step["hf"],
                       "infer_s": lat, "infer_ratio": lat["ours"] / lat["hf"],
                       "merged_vs_hf_unmerged": lat["ours_merged"] / lat["hf"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = bench(args.repeats)
    table = [("method", "parity |Δ|", "trainable ours / HF", "train step ours", "train step HF", "ratio",
              "infer ours", "infer HF", "ratio", "infer merged / HF")]
    for m, r in res.items():
        s, i = r["train_step_s"], r["infer_s"]
        table.append((m, f"{r['parity_max_abs']:.1e}", f"{r['trainable']['ours']:,} / {r['trainable']['hf']:,}",
                      f"{s['ours'] * 1e3:.1f} ms", f"{s['hf'] * 1e3:.1f} ms", f"{r['train_ratio']:.2f}",
                      f"{i['ours'] * 1e3:.1f} ms", f"{i['hf'] * 1e3:.1f} ms", f"{r['infer_ratio']:.2f}",
                      f"{r['merged_vs_hf_unmerged']:.2f}"))
    write("dora_vera", {"repeats": args.repeats, "config": "llama 4x512, vocab 8192, fp32 CPU, train 4x128, "
                        "infer 1x128", **res}, table)


if __name__ == "__main__":
    main()
