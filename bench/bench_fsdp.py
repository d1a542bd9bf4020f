"""FSDP2 on CPU (gloo): what each rank holds, peftfx per block vs peftfx's root unit vs HF PEFT per decoder layer.

    python bench/bench_fsdp.py [--ranks 2 4] [--layers 8] [--hidden 256] [--steps 3] [--rounds 2]

A Llama (random init, seeded; default 8 layers, hidden 256, intermediate 688, 4 heads, 2 KV heads, vocab 2048), LoRA
rank 8 (α 16) on q/v, SGD, the model's causal-LM loss, batch 2 × 64 per rank (different data per rank). For each
world size, one spawn of that many processes (1 torch thread each) runs every configuration ``--rounds`` times,
interleaved (A B C, C B A, …):

* ``peftfx_blocks`` — ``peftfx.integrations.fsdp.fully_shard_blocks(peft)`` (one FSDP2 unit per block + the root);
* ``peftfx_root`` — ``fully_shard(peft)`` (one unit at the root: every parameter gathered for forward and backward);
* ``hf_layers`` — HF PEFT's ``get_peft_model`` with ``fully_shard`` on each ``model.layers.N`` then on the root (the
  usual FSDP2 recipe for a Hugging Face model).

Both peftfx configurations end with ``release_original`` (``fully_shard_blocks`` calls it); the column "original
held" is what the module ``apply`` traced still held beside the shards just before it (``original_bytes``): without
the release, every rank would keep a full copy of the base.

Memory is counted, not sampled from RSS (``peftfx.integrations.fsdp``): ``local`` = bytes of parameter storage a
rank holds at rest (its shards); ``peak gathered`` = the most unsharded parameter bytes alive at once during the
training steps (``GatheredPeak``: sampled at every module's forward entry/exit and at every tensor autograd saves
or reads back), so ``local + peak gathered`` is the peak parameter memory of a rank. Activations, gradients,
optimizer state and transient collective buffers are not counted. Step time is the median over rounds of the
mean step time (rank 0; gloo on a shared 2-core machine: indicative only). Results: bench/results/fsdp.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench._common import write

CONFIGS = ("peftfx_blocks", "peftfx_root", "hf_layers")


def _model(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=a.layers, hidden_size=a.hidden,
                                        intermediate_size=a.inter, num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=a.vocab, max_position_embeddings=256))


def _data(a, rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, a.vocab, (2, a.seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def _build(a, config):
    from torch.distributed.fsdp import fully_shard

    import peftfx
    from peftfx import LoRA, select
    from peftfx.integrations.fsdp import (
        fully_shard_blocks,
        original_bytes,
        release_original,
    )

    base = _model(a).train()
    if config == "hf_layers":
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        for layer in m.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(m)
        return m.train(), 0
    m = peftfx.apply(base, LoRA(rank=8, alpha=16, targets=select.role("attn.q", "attn.v")), _data(a, 0, 0)).train()
    if config == "peftfx_blocks":
        fully_shard_blocks(m, release=False)      # by default it ends with release_original(m) itself
    else:
        fully_shard(m)
    held = original_bytes(m)                      # what the traced-from module still holds beside the shards
    release_original(m)
    return m, held


def _run(a, rank, config):
    from peftfx.integrations.fsdp import GatheredPeak, local_bytes

    m, held = _build(a, config)
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    def step(i):
        loss = m(**_data(a, rank, i)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(0)                                             # warm-up (first-call costs)
    dist.barrier()
    with GatheredPeak(m) as peak:
        t0 = time.perf_counter()
        for i in range(1, a.steps + 1):
            step(i)
        dt = (time.perf_counter() - t0) / a.steps
    return {"total": total, "local": local_bytes(m), "peak_gathered": peak.bytes, "step_s": dt, "held": held}


def _worker(rank, world, port, a, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        runs = {c: [] for c in CONFIGS}
        for r in range(a.rounds):
            for c in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                runs[c].append(_run(a, rank, c))
        torch.save(runs, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=688)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    results, table = {}, [("ranks", "config", "params MB (all)", "local MB/rank", "local × ranks / all",
                           "peak gathered MB", "peak params MB/rank", "vs peftfx_root", "vs hf_layers", "original held MB", "step s")]
    for world in a.ranks:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_worker, args=(world, _port(), a, out), nprocs=world, join=True)
            ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
        summary = {}
        for c in CONFIGS:
            runs = [run for rk in ranks for run in rk[c]]
            assert len({(run["local"], run["peak_gathered"]) for run in runs}) <= world, c   # counts are exact
            summary[c] = {"total": runs[0]["total"], "local": max(run["local"] for run in runs),
                          "peak_gathered": max(run["peak_gathered"] for run in runs),
                          "step_s": statistics.median(run["step_s"] for run in ranks[0][c]),
                          "original_held_before_release": max(run["held"] for run in runs)}
            summary[c]["peak"] = summary[c]["local"] + summary[c]["peak_gathered"]
        results[str(world)] = summary
        mb = 1 / 2**20
        for c in CONFIGS:
            s = summary[c]
            table.append((world, c, f"{s['total'] * mb:.2f}", f"{s['local'] * mb:.3f}",
                          f"{s['local'] * world / s['total']:.3f}", f"{s['peak_gathered'] * mb:.3f}",
                          f"{s['peak'] * mb:.3f}", f"{s['peak'] / summary['peftfx_root']['peak']:.3f}",
                          f"{s['peak'] / summary['hf_layers']['peak']:.3f}",
                          f"{s['original_held_before_release'] * mb:.2f}", f"{s['step_s']:.3f}"))
    results["args"] = vars(a)
    write("fsdp", results, table)


if __name__ == "__main__":
    main()
