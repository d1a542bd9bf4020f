"""Mixed-batch throughput: one forward where each row uses its own LoRA adapter, against running the
adapters one after another (each on its own rows), for peftfx and Hugging Face PEFT side by side.

    python bench/bench_multi.py [--repeats 10] [--threads 2] [--adapters 4] [--batch 16] [--seq 64]

Model: Llama-shaped, 4 layers, hidden 512, vocab 32000 (random weights); K LoRA adapters of rank 8 on
q, k, v, o; rows assigned round-robin (row b → adapter b mod K). Inference (no grad). Medians of interleaved
repeats; tokens/s = batch·seq / median. Results: bench/results/multi.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import interleaved, write  # noqa: E402


def build(k: int):
    import peftfx
    from peft import LoraConfig, get_peft_model
    from peftfx import LoRA, select
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=512, intermediate_size=1376,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)).eval()
    names = [f"a{i}" for i in range(k)]
    ex = {"input_ids": torch.randint(0, 32000, (2, 16))}
    pm = peftfx.trace(copy.deepcopy(base), ex)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    hf = get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for n in names[1:]:
        hf.add_adapter(n, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in names:
            peftfx.add_adapter(pm, n, LoRA(rank=8, alpha=16, targets=select.role("attn.*") & ~select.role("attn.qkv")))
        for name, mod in hf.named_modules():
            if hasattr(mod, "lora_A") and names[0] in mod.lora_A:
                multi = pm.get_submodule(name.replace("base_model.model.", "") + ".lora")
                for n in names:
                    mod.lora_B[n].weight.copy_(torch.randn(mod.lora_B[n].weight.shape, generator=g) * 0.02)
                    multi.adapters[n].lora_A.copy_(mod.lora_A[n].weight)
                    multi.adapters[n].lora_B.copy_(mod.lora_B[n].weight)
    hf.eval()
    pm.eval()
    return pm, hf, names


def main():
    import peftfx

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pm, hf, names = build(a.adapters)
    ids = torch.randint(0, 32000, (a.batch, a.seq), generator=torch.Generator().manual_seed(2))
    rows = [names[b % len(names)] for b in range(a.batch)]
    groups = {n: [b for b, r in enumerate(rows) if r == n] for n in names}

    def ours_mixed():
        return peftfx.forward_mixed(pm, rows, input_ids=ids).logits

    def ours_sequential():
        out = torch.empty(a.batch, a.seq, 32000)
        for n, idx in groups.items():
            peftfx.set_active(pm, n)
            out[idx] = pm(input_ids=ids[idx]).logits
        return out

    def hf_mixed():
        return hf(input_ids=ids, adapter_names=rows).logits

    def hf_sequential():
        out = torch.empty(a.batch, a.seq, 32000)
        for n, idx in groups.items():
            hf.set_adapter(n)
            out[idx] = hf(input_ids=ids[idx]).logits
        return out

    fns = {"ours_mixed": ours_mixed, "ours_sequential": ours_sequential, "hf_mixed": hf_mixed,
           "hf_sequential": hf_sequential}
    with torch.inference_mode():
        outs = {k: f() for k, f in fns.items()}
        parity = {k: float((v - outs["hf_sequential"]).abs().max()) for k, v in outs.items()}
        t = interleaved(fns, repeats=a.repeats)
    tokens = a.batch * a.seq
    res = {"config": vars(a), "median_s": t, "tokens_per_s": {k: tokens / v for k, v in t.items()},
           "max_abs_diff_vs_hf_sequential": parity,
           "ratios": {"ours_mixed/ours_sequential": t["ours_mixed"] / t["ours_sequential"],
                      "ours_mixed/hf_mixed": t["ours_mixed"] / t["hf_mixed"],
                      "hf_mixed/hf_sequential": t["hf_mixed"] / t["hf_sequential"]}}
    table = [("mode", "median s", "tokens/s", "max |Δ| vs HF sequential")]
    table += [(k, f"{t[k]:.4f}", f"{tokens / t[k]:.0f}", f"{parity[k]:.1e}") for k in fns]
    table += [(k, f"{v:.3f}", "", "") for k, v in res["ratios"].items()]
    write("multi", res, table)


if __name__ == "__main__":
    main()
