"""apply() compile time: peftfx as it traces by default, peftfx as it traced before, HF get_peft_model; cold and on
a trace-cache hit.

    python bench/bench_apply.py [--repeats 3] [--threads 2] [--meta-repeats 1]

Cold means the in-process trace cache is off (``PEFTFX_TRACE_CACHE=0``): every apply() runs ``torch.export``.
"new" is the default (``peftfx.trace_replicate``: each distinct block traced once, then copied, and
``peftfx.trace_symbolic``: a static export re-marked symbolic); "before" sets ``PEFTFX_TRACE_REPLICATE=0`` and
``PEFTFX_SYMBOLIC_TRACE=0`` (one dynamic torch.export of the whole model); "hit" is apply() with the caches on, on a
model of an architecture applied once before with the same rules (apply's cache: no trace, plan, passes or code
generation); "trace hit" the same with apply's cache off (``PEFTFX_APPLY_CACHE=0``: the traced graph and the
rule-independent analysis — sites, roles — are reused, plan, passes and code generation run; what every
``load_adapter`` on a second instance does); "new rules" apply() with both caches on and rules never applied before
(each call a LoRA with another ``alpha``: a miss of apply's cache, a trace-cache hit, and apply's cache records the
result). Per model the six are interleaved (rotating order), each on a fresh
deep copy of the same base model, medians of ``--repeats``; LoRA r=8 α=16 on the attention q/v projections (GPT-2's
fused ``c_attn`` whole, as HF PEFT takes it), trainable counts asserted equal to HF PEFT's. Models: Llama 4×512
(random init), all-MiniLM-L6-v2 (real weights, the bundled package), GPT-2 small (random init, 12×768), and the
7B-shaped Llama on the meta device (each apply in its own subprocess: seconds and peak RSS, VmHWM).
Results go to bench/results/apply.{json,md}.
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


def models():
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.models import minilm

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config()).eval()      # GPT-2 small: 12 layers, hidden 768
    return {"llama-4x512": (llama(), ["q_proj", "v_proj"], False, ("attn.q", "attn.v")),
            "minilm-l6 (real)": (minilm()[0], ["query", "value"], False, ("attn.q", "attn.v")),
            "gpt2-small": (gpt2, ["c_attn"], True, ("attn.qkv",))}


def bench_model(base, hf_targets, fan_in_fan_out, roles, repeats):
    from peft import LoraConfig, get_peft_model

    import peftfx

    ids = torch.randint(0, 1000, (2, 32))
    rule = peftfx.LoRA(rank=8, alpha=16, targets=peftfx.select.role(*roles))

    fresh = iter(range(1, 10_000))

    def ours(new, cache=False, applied=True, new_rules=False):
        def run(m):
            os.environ["PEFTFX_TRACE_REPLICATE"] = os.environ["PEFTFX_SYMBOLIC_TRACE"] = "1" if new else "0"
            os.environ["PEFTFX_TRACE_CACHE"] = "1" if cache else "0"
            os.environ["PEFTFX_APPLY_CACHE"] = "1" if applied else "0"
            r = peftfx.LoRA(rank=8, alpha=16 + next(fresh) / 64, targets=rule.selector) if new_rules else rule
            try:
                return peftfx.apply(m, r, {"input_ids": ids})
            finally:
                os.environ["PEFTFX_TRACE_CACHE"] = "0"
        return run

    def hf(m):
        return get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=hf_targets, lora_dropout=0.0,
                                            fan_in_fan_out=fan_in_fan_out))

    fns = {"new": ours(True), "before": ours(False), "hit": ours(True, cache=True),
           "trace_hit": ours(True, cache=True, applied=False), "new_rules": ours(True, cache=True, new_rules=True),
           "hf": hf}
    ours(True, cache=True)(copy.deepcopy(base))       # the caches hold this architecture (and rules) for the hits
    times = {k: [] for k in fns}
    counts = {}
    order = list(fns)
    for i in range(repeats + 1):                      # round 0 warms up (imports, first-call costs), not counted
        for k in order[i % len(order):] + order[: i % len(order)]:
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            out = fns[k](m)
            dt = time.perf_counter() - t0
            if i:
                times[k].append(dt)
            counts[k] = sum(p.numel() for p in out.parameters() if p.requires_grad)
    assert len(set(counts.values())) == 1, counts
    return {k: statistics.median(v) for k, v in times.items()} | {"trainable": counts["hf"]}


META_SNIPPET = r"""
import json, os, sys, time, torch, peftfx
torch.set_num_threads(int(sys.argv[1]))
""" + LLAMA_7B_META + r"""
rss0 = hwm_mb()
with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
t0 = time.perf_counter()
peft = peftfx.apply(model, peftfx.LoRA(rank=8, alpha=16), {"input_ids": ids})
dt = time.perf_counter() - t0
print(json.dumps({"apply_s": dt, "peak_rss_mb": hwm_mb(), "rss_after_imports_mb": rss0,
                  "nodes": len(peft.graph.nodes), "adapters": len(peft.peft_info.adapters)}))
"""


def bench_meta(threads, repeats):
    runs = {"new": [], "before": []}
    for i in range(repeats):
        for k in (("new", "before") if i % 2 == 0 else ("before", "new")):
            flag = "1" if k == "new" else "0"
            env = dict(os.environ, PEFTFX_TRACE_REPLICATE=flag, PEFTFX_SYMBOLIC_TRACE=flag, PEFTFX_TRACE_CACHE="0")
            out = subprocess.run([sys.executable, "-c", META_SNIPPET, str(threads)], capture_output=True, text=True,
                                 check=True, env=env)
            runs[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs["new"][0]["adapters"] == runs["before"][0]["adapters"]     # node counts differ: sym_size nodes
    return {k: {"apply_s": statistics.median(r["apply_s"] for r in v), "peak_rss_mb": max(r["peak_rss_mb"] for r in v),
                "nodes": v[0]["nodes"], "adapters": v[0]["adapters"]} for k, v in runs.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--meta-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["PEFTFX_TRACE_CACHE"] = "0"
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    results = {"threads": args.threads, "repeats": args.repeats, "load_average": os.getloadavg()}
    table = [("model", "peftfx new s", "peftfx before s", "cache hit s", "trace-cache hit s", "new rules s",
              "HF get_peft_model s", "new/HF", "before/HF", "hit/HF", "trace hit/HF", "new rules/HF", "before/new")]
    for name, (model, targets, fif, roles) in models().items():
        r = bench_model(model, targets, fif, roles, args.repeats)
        results[name] = r
        table.append((name, f"{r['new']:.2f}", f"{r['before']:.2f}", f"{r['hit']:.4f}", f"{r['trace_hit']:.3f}",
                      f"{r['new_rules']:.3f}", f"{r['hf']:.3f}", f"{r['new'] / r['hf']:.0f}×",
                      f"{r['before'] / r['hf']:.0f}×", f"{r['hit'] / r['hf']:.2f}×",
                      f"{r['trace_hit'] / r['hf']:.2f}×", f"{r['new_rules'] / r['hf']:.2f}×",
                      f"{r['before'] / r['new']:.2f}×"))
        print(name, json.dumps(r))
    meta = bench_meta(args.threads, args.meta_repeats)
    results["llama-7b-meta"] = meta
    rep, whole = meta["new"], meta["before"]
    table.append(("llama-7B meta (peak RSS MB)", f"{rep['apply_s']:.2f} ({rep['peak_rss_mb']:.0f})",
                  f"{whole['apply_s']:.2f} ({whole['peak_rss_mb']:.0f})", "", "", "", "", "", "", "", "", "",
                  f"{whole['apply_s'] / rep['apply_s']:.2f}×"))
    results["load_average_after"] = os.getloadavg()
    write("apply", results, table)


if __name__ == "__main__":
    main()
