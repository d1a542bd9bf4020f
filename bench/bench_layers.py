"""Activation checkpointing: peak training memory and step time, peftfx vs Hugging Face PEFT, side by side.

    python bench/bench_layers.py [--threads 2] [--steps 3] [--rounds 2] [--layers 8] [--hidden 512] [--seq 256]

A Llama (random init, seeded; default 8 layers, hidden 512, intermediate 1376, 8 heads, vocab 8000, batch 2 × 256 —
smaller than the issue's 16 × 1024 at 4 × 512, which a shared 2-core machine cannot run in reasonable time), LoRA
rank 16 (α 32, no dropout) on every attention and MLP projection, AdamW, the model's own causal-LM loss (labels).
Four configurations: peftfx with ``peftfx.gradient_checkpointing(peft)``, HF PEFT with the base model's
``gradient_checkpointing_enable(use_reentrant=False)``, and both without checkpointing. Each run is a fresh
subprocess (so peak RSS is its own: ``VmHWM`` of /proc/self/status, reset with ``clear_refs`` before training);
runs are interleaved (A B C D, D C B A, …). Reported per configuration: median over runs of the peak RSS
during training (one warm-up and ``--steps`` timed steps) above the RSS after setup (activations, gradients,
optimizer state: what training adds; the trace's own peak is excluded), median step time,
and the ratios. Results: bench/results/layers.{json,md}. ``--timing-only``: step time of peftfx and HF PEFT, each with
and without checkpointing (toggled on one model per library), in one process, interleaved step by step (bench/results/layers_timing.{json,md}).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import write

CHILD = r"""
import json, sys, time, statistics, torch
sys.path.insert(0, ROOT)
torch.set_num_threads(THREADS)
from transformers import LlamaConfig, LlamaForCausalLM
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**CFG)).train()
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), generator=g)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if LIB == "peftfx":
    import peftfx
    from peftfx import LoRA, select
    m = peftfx.apply(model, LoRA(rank=16, alpha=32, targets=select.role("attn.*") | select.role("mlp.*")),
                     {"input_ids": ids, "labels": ids})
    m.train()
    if CKPT:
        peftfx.gradient_checkpointing(m)
else:
    from peft import LoraConfig, get_peft_model
    if CKPT:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    m.train()
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
def step():
    loss = m(input_ids=ids, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()
open("/proc/self/clear_refs", "w").write("5")        # VmHWM := current RSS (forget the trace's peak)
before = status("VmRSS")                             # model, adapters and (peftfx) graph in memory
first = step()                                       # warm-up (allocates gradients and optimizer state)
times = []
for _ in range(STEPS):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps({"peak_mb": status("VmHWM") - before, "step_s": statistics.median(times), "first_loss": first,
                  "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad)}))
"""


def run_child(lib: str, ckpt: bool, args) -> dict:
    cfg = _config(args)
    code = (f"ROOT={ROOT!r}\nTHREADS={args.threads}\nCFG={cfg!r}\nBATCH={args.batch}\nSEQ={args.seq}\n"
            f"STEPS={args.steps}\nLIB={lib!r}\nCKPT={ckpt}\n") + CHILD
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{lib} ckpt={ckpt} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing(args) -> dict:
    """Step time in one process, peftfx and HF PEFT (both checkpointed) interleaved step by step (machine load hits
    both alike): medians of ``--repeats`` steps each, after one warm-up step each."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftfx
    from bench._common import interleaved
    from peftfx import LoRA, select

    torch.set_num_threads(args.threads)
    cfg = LlamaConfig(**_config(args))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ours = peftfx.apply(LlamaForCausalLM(cfg).train(), LoRA(rank=16, alpha=32, targets=select.role("attn.*") |
                        select.role("mlp.*")), {"input_ids": ids, "labels": ids}).train()
    peftfx.gradient_checkpointing(ours)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).train()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).train()

    def stepper(m, ckpt: bool):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def run():
            if m is ours:
                peftfx.gradient_checkpointing(ours, ckpt)
            elif ckpt:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_disable()
            loss = m(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run
    med = interleaved({"peftfx_ckpt": stepper(ours, True), "hf_ckpt": stepper(hf, True),
                       "peftfx_no_ckpt": stepper(ours, False), "hf_no_ckpt": stepper(hf, False)},
                      repeats=args.repeats, warmup=1)
    return {**med, "ratio": med["peftfx_ckpt"] / med["hf_ckpt"], "ratio_no_ckpt": med["peftfx_no_ckpt"] / med["hf_no_ckpt"]}


def _config(args) -> dict:
    return {"num_hidden_layers": args.layers, "hidden_size": args.hidden,
            "intermediate_size": int(args.hidden * 2.6875), "num_attention_heads": args.hidden // 64,
            "num_key_value_heads": args.hidden // 64, "vocab_size": 8000, "max_position_embeddings": max(512, args.seq)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timing-only", action="store_true", help="only the in-process interleaved step timing")
    args = ap.parse_args()
    if args.timing_only:
        res = timing(args)
        write("layers_timing", {"args": vars(args), **res},
              [("config", "median step s")] + [(k, f"{res[k]:.3f}") for k in
                                                 ("peftfx_ckpt", "hf_ckpt", "peftfx_no_ckpt", "hf_no_ckpt")]
              + [("peftfx/hf ckpt", f"{res['ratio']:.3f}"), ("peftfx/hf no ckpt", f"{res['ratio_no_ckpt']:.3f}")])
        return
    configs = [("peftfx", True), ("hf", True), ("peftfx", False), ("hf", False)]
    runs: dict[str, list[dict]] = {f"{lib}_{'ckpt' if c else 'no_ckpt'}": [] for lib, c in configs}
    for r in range(args.rounds):
        for lib, c in (configs if r % 2 == 0 else configs[::-1]):
            res = run_child(lib, c, args)
            runs[f"{lib}_{'ckpt' if c else 'no_ckpt'}"].append(res)
            print(lib, "ckpt" if c else "no ckpt", res, flush=True)
    med = {k: {"peak_mb": statistics.median(x["peak_mb"] for x in v), "step_s": statistics.median(x["step_s"] for x in v),
               "trainable": v[0]["trainable"], "first_loss": v[0]["first_loss"]} for k, v in runs.items()}
    table = [("config", "peak RSS above start MB", "step s", "trainable", "first loss")]
    table += [(k, f"{m['peak_mb']:.0f}", f"{m['step_s']:.3f}", m["trainable"], f"{m['first_loss']:.4f}")
              for k, m in med.items()]
    for what in ("ckpt", "no_ckpt"):
        a, b = med[f"peftfx_{what}"], med[f"hf_{what}"]
        table.append((f"peftfx/hf {what}", f"{a['peak_mb'] / b['peak_mb']:.3f}", f"{a['step_s'] / b['step_s']:.3f}", "", ""))
    for lib in ("peftfx", "hf"):
        a, b = med[f"{lib}_ckpt"], med[f"{lib}_no_ckpt"]
        table.append((f"{lib} ckpt/no_ckpt", f"{a['peak_mb'] / b['peak_mb']:.3f}", f"{a['step_s'] / b['step_s']:.3f}", "", ""))
    write("layers", {"args": vars(args), "runs": runs, "median": med}, table)


if __name__ == "__main__":
    main()
