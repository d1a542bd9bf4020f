"""Virtual-token methods benchmark: peftfx prompt tuning, p-tuning and prefix tuning (plain and with the
reparameterisation MLP) against Hugging Face PEFT's same methods, side by side in one process.

    python bench/bench_methods_virtual.py [--repeats 10] [--threads 2] [--tokens 20]

Model: Llama-shaped, 4 layers, hidden 512 (intermediate 1376, 8 heads, 8 kv heads, vocab 32000), float32 on CPU;
N = 20 virtual tokens; encoder hidden size 128 for p-tuning (MLP) and prefix projection.
  trainable parameters (ours / HF, must be equal), train-step time at batch 4 × 128 with AdamW (ours / HF
  ratio, ≤ 1.0 is the target; the loss is logsumexp of the logits each model returns — HF's causal LM returns
  N + S positions for prompt tuning and p-tuning, peftfx S), inference latency at batch 1 × 128 of base eager /
  peftfx unfolded / peftfx folded (:func:`peftfx.fold`) / HF PEFT (ratios to base).
Timings are medians of interleaved repeats; results go to bench/results/methods_virtual.{json,md}.
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



def _methods(n: int):
    import peftfx
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {
        "prompt": (peftfx.PromptTuning(num_virtual_tokens=n),
                   PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)),
        "ptuning": (peftfx.PTuning(num_virtual_tokens=n, encoder_hidden_size=128),
                    PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=128)),
        "prefix": (peftfx.PrefixTuning(num_virtual_tokens=n),
                   PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)),
        "prefix_mlp": (peftfx.PrefixTuning(num_virtual_tokens=n, projection=True, encoder_hidden_size=128),
                       PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=True,
                                          encoder_hidden_size=128)),
    }


def bench_method(name, ours_rule, hf_config, base, ids, train_ids, repeats: int) -> dict:
    import peftfx
    from peft import get_peft_model

    ours = peftfx.apply(copy.deepcopy(base), ours_rule, {"input_ids": ids})
    hf = get_peft_model(copy.deepcopy(base), hf_config)
    params = {"ours": _trainable(ours), "hf": _trainable(hf)}
    if params["ours"] != params["hf"]:
        raise RuntimeError(f"{name}: trainable parameters differ: {params}")
    train = interleaved({"ours": _step(ours, train_ids), "hf": _step(hf, train_ids)}, repeats=repeats)
    ours.eval()
    hf.eval()
    folded = peftfx.fold(ours)
    lat = interleaved({"base": _infer(base, ids), "unfolded": _infer(ours, ids), "folded": _infer(folded, ids),
                       "hf": _infer(hf, ids)}, repeats=repeats * 2)
    return {"trainable_params": params, "train_step_s": train, "train_ratio_ours_over_hf": train["ours"] / train["hf"],
            "latency_s": lat, "latency_ratio_to_base": {k: v / lat["base"] for k, v in lat.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    base = llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 128), generator=g)
    train_ids = torch.randint(0, 1000, (4, 128), generator=g)
    results = {name: bench_method(name, ours, hf, base, ids, train_ids, args.repeats)
               for name, (ours, hf) in _methods(args.tokens).items()}
    print(json.dumps(results, indent=1))
    table = [("llama-4x512, N=%d" % args.tokens, "trainable ours / HF", "train step ours / HF (ms)", "train ratio",
              "unfolded/base", "folded/base", "HF/base")]
    for name, r in results.items():
        p, t, q = r["trainable_params"], r["train_step_s"], r["latency_ratio_to_base"]
        table.append((name, f"{p['ours']:,} / {p['hf']:,}", f"{t['ours'] * 1e3:.1f} / {t['hf'] * 1e3:.1f}",
                      f"{r['train_ratio_ours_over_hf']:.3f}", f"{q['unfolded']:.3f}", f"{q['folded']:.3f}",
                      f"{q['hf']:.3f}"))
    write("methods_virtual", {"threads": args.threads, "repeats": args.repeats, "tokens": args.tokens, **results},
          table)


if __name__ == "__main__":
    main()
