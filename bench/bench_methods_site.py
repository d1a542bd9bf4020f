"""Site-based methods benchmark: peftfx IA3 vs Hugging Face PEFT IA3 side by side in one process, and the
Houlsby adapter (HF PEFT has none) against the base model.

    python bench/bench_methods_site.py [--repeats 15] [--threads 2]

Model: Llama-shaped, 4 layers, hidden 512 (intermediate 1376, 8 heads, vocab 32000), float32 on CPU.
  IA3 (k_proj, v_proj, down_proj as feed-forward): trainable parameters (ours / HF), train-step time at
  batch 4 × 128 with AdamW (ours / HF ratio, ≤ 1.0 is the target), inference latency at batch 1 × 128 of
  base eager / traced base / peftfx unmerged / peftfx merged / HF PEFT unmerged (ratios to base).
  Houlsby adapter (bottleneck 64, attention and MLP blocks): trainable parameters, train-step time,
  inference latency (not mergeable: merged = unmerged).
Timings are medians of interleaved repeats; results go to bench/results/methods_site.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import interleaved, write  # noqa: E402
from bench._common import infer as _infer, train_step as _step, trainable as _trainable  # noqa: E402
from bench._common import llama  # noqa: E402



def bench(repeats: int) -> dict:
    import peftfx
    from peft import IA3Config, get_peft_model

    base = llama()
    ids = torch.randint(0, 1000, (1, 128))
    train_ids = torch.randint(0, 1000, (4, 128))
    ia3 = peftfx.apply(copy.deepcopy(base), peftfx.IA3(), {"input_ids": ids})
    hf = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"]))
    houlsby = peftfx.apply(copy.deepcopy(base), peftfx.Adapter(bottleneck=64), {"input_ids": ids})
    params = {"ia3_ours": _trainable(ia3), "ia3_hf": _trainable(hf), "adapter_ours": _trainable(houlsby)}
    if params["ia3_ours"] != params["ia3_hf"]:
        raise RuntimeError(f"trainable parameters differ: {params}")

    train = interleaved({"ia3_ours": _step(ia3, train_ids), "ia3_hf": _step(hf, train_ids),
                         "adapter_ours": _step(houlsby, train_ids)}, repeats=repeats)
    for m in (ia3, hf, houlsby):
        m.eval()
    merged = peftfx.merge(ia3)
    traced = peftfx.trace(copy.deepcopy(base), {"input_ids": ids})
    lat = interleaved({"base": _infer(base, ids), "traced_base": _infer(traced, ids),
                       "ia3_unmerged": _infer(ia3, ids), "ia3_merged": _infer(merged, ids),
                       "ia3_hf_unmerged": _infer(hf, ids), "adapter_ours": _infer(houlsby, ids)},
                      repeats=repeats * 2)
    return {"trainable_params": params, "train_step_s": train,
            "train_ratio_ia3_ours_over_hf": train["ia3_ours"] / train["ia3_hf"],
            "latency_s": lat, "latency_ratio_to_base": {k: v / lat["base"] for k, v in lat.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    r = bench(args.repeats)
    print(json.dumps(r, indent=1))
    p, t, q = r["trainable_params"], r["train_step_s"], r["latency_ratio_to_base"]
    table = [("llama-4x512", "trainable ours / HF", "train step ours / HF (ms)", "train ratio",
              "unmerged/base", "merged/base", "HF unmerged/base", "traced base/base"),
             ("IA3", f"{p['ia3_ours']:,} / {p['ia3_hf']:,}", f"{t['ia3_ours'] * 1e3:.1f} / {t['ia3_hf'] * 1e3:.1f}",
              f"{r['train_ratio_ia3_ours_over_hf']:.3f}", f"{q['ia3_unmerged']:.3f}", f"{q['ia3_merged']:.3f}",
              f"{q['ia3_hf_unmerged']:.3f}", f"{q['traced_base']:.3f}"),
             ("Houlsby adapter (m=64)", f"{p['adapter_ours']:,} / n/a", f"{t['adapter_ours'] * 1e3:.1f} / n/a", "n/a",
              f"{q['adapter_ours']:.3f}", f"{q['adapter_ours']:.3f} (not mergeable)", "n/a", "")]
    write("methods_site", {"threads": args.threads, "repeats": args.repeats, **r}, table)


if __name__ == "__main__":
    main()
