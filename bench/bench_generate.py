"""Generation speed: peftfx ``generate`` (adapted graphs, KV cache) against Hugging Face PEFT ``generate`` on the
same weights, and time per new token against prompt length (flat with a cache, growing without one).

    python bench/bench_generate.py [--repeats 5] [--threads 1] [--new 16] [--lengths 16 64 256]

Model: a small Llama (4 layers, hidden 256, 4 heads / 2 kv heads, vocab 4096, random weights), LoRA rank 8 on
q and v with random B (so the adapter changes the tokens). Greedy decoding of ``--new`` tokens, EOS disabled so
every run generates the same count. Part 1: batch 1 and 8 (prompts of 32 tokens, left-padded to different lengths
for batch 8): peftfx vs HF PEFT, tokens asserted identical, medians of interleaved repeats, tokens/s = batch·new /
median. Part 2: batch 1, prompt lengths ``--lengths``: seconds per new token = (median(prompt + new tokens) −
median(prompt + 1 token)) / (new − 1), i.e. the decode steps alone, for peftfx with and without its cache.
The machine's load average at the start and end is recorded (the development machine is shared).
Results: bench/results/generate.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import interleaved, write

VOCAB = 4096


def build():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftfx
    from peftfx import LoRA, select

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=688,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=1024)).eval()
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=8, alpha=16, targets=select.role("attn.q", "attn.v")),
                        {"input_ids": torch.randint(0, VOCAB, (2, 16))}).eval()
    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    hf.eval()
    g = torch.Generator().manual_seed(1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
                key = name.replace("base_model.model.", "").replace(".lora_A.default.weight", ".lora.lora_A") \
                    .replace(".lora_B.default.weight", ".lora.lora_B")
                mine[key].copy_(p)
    return hf, ours


def prompts(batch: int, length: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : (b * length) // (2 * batch)] = 0          # left padding: rows of different lengths
    return ids, mask


def gen(model, ids, mask, new, **kw):
    def run():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    hf, ours = build()
    print(f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    load_start = os.getloadavg()
    results, table = {"threads": args.threads, "new_tokens": args.new}, [("case", "peftfx s", "HF PEFT s",
                                                                          "peftfx tok/s", "HF PEFT tok/s",
                                                                          "peftfx/HF speed")]
    for batch in (1, 8):
        ids, mask = prompts(batch, 32)
        a, b = gen(ours, ids, mask, args.new)(), gen(hf, ids, mask, args.new)()
        print(f"batch {batch}: first generate done ({time.perf_counter() - t0:.0f}s, {ours.peft_variants.traces} "
              "traces)", flush=True)
        assert torch.equal(a, b), f"batch {batch}: peftfx and HF PEFT generated different tokens"
        t = interleaved({"peftfx": gen(ours, ids, mask, args.new), "hf": gen(hf, ids, mask, args.new)},
                        repeats=args.repeats, warmup=1)
        tps = {k: batch * args.new / v for k, v in t.items()}
        results[f"batch{batch}"] = {"seconds": t, "tokens_per_s": tps, "same_tokens": True}
        print(f"batch {batch}: {t} ({time.perf_counter() - t0:.0f}s)", flush=True)
        table.append((f"batch {batch}, prompt 32, {args.new} new", f"{t['peftfx']:.3f}", f"{t['hf']:.3f}",
                      f"{tps['peftfx']:.0f}", f"{tps['hf']:.0f}", f"{tps['peftfx'] / tps['hf']:.2f}"))
    table.append(("prompt length (batch 1)", "ms/token cached", "ms/token no cache", "HF PEFT ms/token", "", ""))
    for length in args.lengths:
        ids, mask = prompts(1, length)
        fns = {}
        for name, model, kw in (("cached", ours, {}), ("nocache", ours, {"use_cache": False}), ("hf", hf, {})):
            fns[f"{name}_full"] = gen(model, ids, mask, args.new, **kw)
            fns[f"{name}_one"] = gen(model, ids, mask, 1, **kw)
        t = interleaved(fns, repeats=args.repeats, warmup=1)
        print(f"prompt {length}: {t} ({time.perf_counter() - t0:.0f}s)", flush=True)
        per = {k: (t[f"{k}_full"] - t[f"{k}_one"]) / (args.new - 1) for k in ("cached", "nocache", "hf")}
        results[f"prompt{length}"] = {"seconds": t, "per_token_s": per}
        table.append((f"prompt {length}", f"{per['cached'] * 1e3:.2f}", f"{per['nocache'] * 1e3:.2f}",
                      f"{per['hf'] * 1e3:.2f}", "", ""))
    load_end = os.getloadavg()
    results["load_average"] = {"start": load_start, "end": load_end, "cpu_count": os.cpu_count()}
    fmt = "/".join
    note = (f"load average (1/5/15 min) at start {fmt(f'{x:.1f}' for x in load_start)}, at end "
            f"{fmt(f'{x:.1f}' for x in load_end)}; {os.cpu_count()} CPUs, shared")
    table.append((note, "", "", "", "", ""))
    write("generate", results, table)


if __name__ == "__main__":
    main()
