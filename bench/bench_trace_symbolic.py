"""apply() cold: the static-then-symbolic trace vs the dynamic torch.export vs Hugging Face get_peft_model.

    python bench/bench_trace_symbolic.py [--repeats 5] [--threads 2] [--meta-repeats 3]

LoRA r=8 α=16 on the attention q/v projections (GPT-2: the fused c_attn), example input ids 1 × 128, the trace
cache off (``PEFTFX_TRACE_CACHE=0``: every apply() traces). Per model, the three variants run interleaved
(A B C, C B A, …) on a fresh deep copy of the base model each time (the copy is not timed); medians.
Models: Llama 4×512 (random init), all-MiniLM-L6-v2 (real weights), GPT-2 small (random init), and the 7B-shaped
Llama on the meta device (in a subprocess, so its peak RSS is its own). Results: bench/results/trace_symbolic.*
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import LLAMA_7B_META, llama, write

os.environ["PEFTFX_TRACE_CACHE"] = "0"


def _apply_fns(base, hf_targets, fan_in_fan_out, ids):
    from peft import LoraConfig, get_peft_model

    import peftfx
    from peftfx import LoRA, select

    rule = LoRA(rank=8, alpha=16, targets=select.role("attn.qkv") if fan_in_fan_out else
                select.role("attn.q") | select.role("attn.v"))

    def ours(symbolic):
        def run(m):
            os.environ["PEFTFX_SYMBOLIC_TRACE"] = "1" if symbolic else "0"
            return peftfx.apply(m, rule, {"input_ids": ids})
        return run

    def hf(m):
        return get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=hf_targets, lora_dropout=0.0,
                                            fan_in_fan_out=fan_in_fan_out))

    return {"symbolic": ours(True), "dynamic": ours(False), "hf": hf}


def interleaved_cold(base, fns, repeats):
    """Median seconds of each ``fn(fresh copy of base)``, interleaved A B C, C B A, …; one untimed warm-up each."""
    times = {k: [] for k in fns}
    order = list(fns.items())
    for f in fns.values():
        f(copy.deepcopy(base))
    for i in range(repeats):
        for k, f in (order if i % 2 == 0 else order[::-1]):
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            out = f(m)
            times[k].append(time.perf_counter() - t0)
            del out, m
    return {k: statistics.median(v) for k, v in times.items()}, times


def check_same(base, fns, ids):
    """The symbolic and dynamic graphs give the same logits at a shape other than the traced one."""
    from peftfx import trace_symbolic

    trace_symbolic.clear_info()
    a, b = fns["symbolic"](copy.deepcopy(base)).eval(), fns["dynamic"](copy.deepcopy(base)).eval()
    assert trace_symbolic.info()["symbolic"] == 1, trace_symbolic.info()
    x = torch.randint(0, 1000, (3, 37))
    with torch.no_grad():
        d = (a(input_ids=x)[0] - b(input_ids=x)[0]).abs().max().item()
    return d


def models():
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.models import minilm

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config()).eval()
    return {"llama-4x512": (llama(), ["q_proj", "v_proj"], False),
            "minilm-real": (minilm()[0], ["query", "value"], False),
            "gpt2-small": (gpt2, ["c_attn"], True)}


META_SNIPPET = r"""
import json, os, statistics, sys, time, torch
os.environ["PEFTFX_TRACE_CACHE"] = "0"
torch.set_num_threads(int(sys.argv[1]))
import peftfx
from peft import LoraConfig, get_peft_model
""" + LLAMA_7B_META + r"""
rule = peftfx.LoRA(rank=8, alpha=16, targets=peftfx.select.role("attn.q") | peftfx.select.role("attn.v"))
def ours(symbolic):
    def run(m):
        os.environ["PEFTFX_SYMBOLIC_TRACE"] = "1" if symbolic else "0"
        return peftfx.apply(m, rule, {"input_ids": torch.zeros(1, 128, dtype=torch.long, device="meta")})
    return run
def hf(m):
    return get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
fns = {"symbolic": ours(True), "dynamic": ours(False), "hf": hf}
times = {k: [] for k in fns}
order = list(fns.items())
rss = {}
for i in range(int(sys.argv[2])):
    for k, f in (order if i % 2 == 0 else order[::-1]):
        with torch.device("meta"):
            m = LlamaForCausalLM(cfg)
        t0 = time.perf_counter()
        out = f(m)
        times[k].append(time.perf_counter() - t0)
        if k == "symbolic" and i == 0:
            rss["after_first_symbolic_mb"] = hwm_mb()
        del out, m
print(json.dumps({"median_s": {k: statistics.median(v) for k, v in times.items()}, "all_s": times,
                  "peak_rss_mb": hwm_mb(), **rss}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--meta-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1000, (1, 128))
    results, table = {}, [("model", "apply() symbolic (s)", "apply() dynamic (s)", "HF get_peft_model (s)",
                           "dynamic / symbolic", "symbolic / HF", "max abs diff of logits, sym vs dyn")]
    for name, (base, targets, fan) in models().items():
        if args.only and args.only not in name:
            continue
        fns = _apply_fns(base, targets, fan, ids)
        diff = check_same(base, fns, ids)
        med, raw = interleaved_cold(base, fns, args.repeats)
        results[name] = {"median_s": med, "all_s": raw, "max_abs_diff": diff}
        table.append((name, f"{med['symbolic']:.2f}", f"{med['dynamic']:.2f}", f"{med['hf']:.3f}",
                      f"{med['dynamic'] / med['symbolic']:.2f}x", f"{med['symbolic'] / med['hf']:.0f}x",
                      f"{diff:.1e}"))
        print(table[-1], flush=True)
    if not args.only or "meta" in args.only:
        out = subprocess.run([sys.executable, "-c", META_SNIPPET, str(args.threads), str(args.meta_repeats)],
                             capture_output=True, text=True, check=True, env=dict(os.environ))
        meta = json.loads(out.stdout.strip().splitlines()[-1])
        results["llama-7b-meta"] = meta
        med = meta["median_s"]
        table.append(("llama-7B meta", f"{med['symbolic']:.2f}", f"{med['dynamic']:.2f}", f"{med['hf']:.3f}",
                      f"{med['dynamic'] / med['symbolic']:.2f}x", f"{med['symbolic'] / med['hf']:.0f}x",
                      f"peak RSS {meta['peak_rss_mb']:.0f} MB"))
    results["repeats"] = {"models": args.repeats, "meta": args.meta_repeats}
    write("trace_symbolic" + (f"_{args.only}" if args.only else ""), results, table)


if __name__ == "__main__":
    main()
