"""QLoRA memory: a Llama of ~170M parameters (hidden 1024, 8 layers, intermediate 2816, vocab 32000) with
a float32 base against the same base in NF4 and int8, LoRA (rank 16) on every attention/MLP projection.

    python bench/bench_qlora.py [--threads 2] [--steps 2]

Each variant runs in a fresh subprocess (peak RSS = ``VmHWM`` of /proc/self/status): float32 builds the model and traces it;
NF4/int8 (every linear but the LM head; "nf4_all_weights": embedding and head too) build it on the meta device, trace, and quantize while loading from a safetensors file
(``peftfx.quantize(pm, bits, source=reader)``, plain file reads), so the float weights never sit in memory together.
Each then adds LoRA, runs ``--steps`` AdamW train steps (batch 2 × 64) and one eval forward. Reported: peak
RSS minus the RSS after imports, base tensor bytes (parameters + buffers not in adapters; the quantized
weights alone), train-step time
(median), and the relative logit error of the quantized base against float32. Also the quantize→dequantize
round-trip error on the real all-MiniLM-L6-v2 linear weights, and its encoder's last hidden state (real
tokens) and mean-pooled sentence embedding with a quantized base against float. Results: bench/results/qlora.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import write  # noqa: E402

CFG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=16, vocab_size=32000, max_position_embeddings=512)

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, ROOT)
torch.set_num_threads(THREADS)
import peftfx
from peftfx import LoRA, select
from transformers import LlamaConfig, LlamaForCausalLM
def rss():  # peak RSS of this process image in MB (VmHWM; ru_maxrss would carry the parent's peak over exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
base_rss = rss()
cfg = LlamaConfig(**CFG)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 32000, (2, 64), generator=g)
ex = {"input_ids": ids, "labels": ids}
rule = LoRA(rank=16, alpha=32, targets=select.role("attn.*") | select.role("mlp.*"))
if MODE == "float32":
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    pm = peftfx.apply(model, rule, ex)
    del model
else:
    class Reader:  # plain reads, no mmap: a mapped file's touched pages would count in this process's RSS
        def __init__(self, path):
            self.f = open(path, "rb")
            n = int.from_bytes(self.f.read(8), "little")
            self.head, self.base = json.loads(self.f.read(n)), 8 + n
        def keys(self): return [k for k in self.head if k != "__metadata__"]
        def get_tensor(self, k):
            e = self.head[k]
            self.f.seek(self.base + e["data_offsets"][0])
            buf = bytearray(self.f.read(e["data_offsets"][1] - e["data_offsets"][0]))
            return torch.frombuffer(buf, dtype={"F32": torch.float32}[e["dtype"]]).reshape(e["shape"])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).eval()
    meta_ex = {k: v.to("meta") for k, v in ex.items()}
    pm = peftfx.trace(model, meta_ex)
    del model
    peftfx.quantize(pm, bits=BITS, source=Reader(PATH), recompute=RECOMPUTE, targets=select.all() if ALLW else None)
    torch.manual_seed(0)
    peftfx.add_adapter(pm, "default", rule)
load_rss = rss()
adapters = {id(p) for n in pm.peft_info.adapters for p in pm.get_submodule(n).parameters()}
base_bytes = sum(t.numel() * t.element_size() for t in list(pm.parameters()) + list(pm.buffers()) if id(t) not in adapters)
with torch.no_grad():
    pm.eval()
    logits = pm(**ex).logits
torch.save(logits, OUT)
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
pm.train()
times = []
for _ in range(STEPS):
    t0 = time.perf_counter()
    loss = pm(**ex).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
qbytes = sum(b.numel() * b.element_size() for m in peftfx.quant.quantized_weights(pm).values() for b in m.buffers())
print(json.dumps({"base_bytes": base_bytes, "quantized_bytes": qbytes, "n_quantized": len(peftfx.quant.quantized_weights(pm)), "load_peak_rss_mb": load_rss - base_rss, "train_peak_rss_mb": rss() - base_rss,
                  "step_s": sorted(times)[len(times) // 2], "loss": loss.item(),
                  "params": sum(p.numel() for p in pm.parameters()) + sum(b.numel() for b in pm.buffers())}))
"""


def prepare(path: str) -> int:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    save_file({k: v.contiguous() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()},
              path)
    return sum(p.numel() for p in model.parameters())


def run(mode: str, bits: int, recompute: bool, path: str, out: str, threads: int, steps: int,
        all_weights: bool = False) -> dict:
    code = CHILD
    for k, v in {"ROOT": repr(ROOT), "THREADS": threads, "CFG": repr(CFG), "MODE": repr(mode), "BITS": bits,
                 "RECOMPUTE": recompute, "PATH": repr(path), "OUT": repr(out), "STEPS": steps,
                 "ALLW": all_weights}.items():
        code = code.replace(k, str(v))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}   # fixed: glibc's sliding threshold inflates RSS
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def minilm_roundtrip() -> dict:
    from peftfx import quant
    from tests import models as M

    model, _ = M.minilm()
    out = {}
    for bits in (4, 8):
        errs = [quant.roundtrip_error(m.weight, bits) for m in model.modules()
                if isinstance(m, torch.nn.Linear) and m.weight.shape[0] > 2]
        out[f"bits{bits}"] = {k: {"median": statistics.median(e[k] for e in errs), "max": max(e[k] for e in errs)}
                              for k in errs[0]}
    # the encoder with a quantized base: last hidden state against float (real pretrained weights)
    import peftfx

    _, tok = M.minilm()
    enc = tok(["graphs are programs too", "a small test sentence about quantization"], padding=True,
              return_tensors="pt")
    kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        ref = model.bert(**kw).last_hidden_state
        for bits in (4, 8):
            pm = peftfx.trace(model.bert, kw)
            peftfx.quantize(pm, bits=bits)
            got = pm(**kw).last_hidden_state
            m = enc["attention_mask"].bool()                    # real tokens only (padding is arbitrary)
            out[f"bits{bits}"]["hidden_rel_err"] = float((got[m] - ref[m]).norm() / ref[m].norm())
            w = enc["attention_mask"][..., None].float()
            out[f"bits{bits}"]["sentence_cos"] = float(torch.nn.functional.cosine_similarity(
                (got * w).sum(1) / w.sum(1), (ref * w).sum(1) / w.sum(1)).min())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "llama.safetensors")
        n_params = prepare(path)
        variants = [("float32", 32, True), ("nf4", 4, True), ("int8", 8, True), ("nf4_no_recompute", 4, False),
                    ("nf4_all_weights", 4, True)]
        res = {}
        for name, bits, rec in variants:
            res[name] = run("float32" if bits == 32 else "quant", bits, rec, path, os.path.join(d, f"{name}.pt"),
                            a.threads, a.steps, all_weights=name.endswith("all_weights"))
            print(name, res[name], flush=True)
        ref = torch.load(os.path.join(d, "float32.pt"))
        for name, *_ in variants[1:]:
            got = torch.load(os.path.join(d, f"{name}.pt"))
            res[name]["logits_rel_err"] = float((got - ref).norm() / ref.norm())
    f = res["float32"]
    for name in res:
        res[name]["base_bytes_ratio"] = f["base_bytes"] / res[name]["base_bytes"]
        res[name]["train_rss_ratio"] = f["train_peak_rss_mb"] / res[name]["train_peak_rss_mb"]
    report = {"model_params": n_params, "variants": res, "minilm_roundtrip": minilm_roundtrip()}
    table = [("base", "base tensors MB", "ratio vs fp32", "peak RSS load MB", "peak RSS train MB", "RSS ratio",
              "step s", "logits rel err")]
    for name, r in res.items():
        table.append((name, f"{r['base_bytes'] / 2**20:.0f} ({r['n_quantized']} quantized: "
                      f"{r['quantized_bytes'] / 2**20:.0f})", f"{r['base_bytes_ratio']:.2f}",
                      f"{r['load_peak_rss_mb']:.0f}", f"{r['train_peak_rss_mb']:.0f}", f"{r['train_rss_ratio']:.2f}",
                      f"{r['step_s']:.2f}", f"{r.get('logits_rel_err', 0):.3f}"))
    for bits, e in report["minilm_roundtrip"].items():
        table.append((f"MiniLM {bits} round trip", "rel Frobenius (median/max)",
                      f"{e['rel_fro']['median']:.4f}/{e['rel_fro']['max']:.4f}", "max rel (median/max)",
                      f"{e['max_rel']['median']:.4f}/{e['max_rel']['max']:.4f}", "mean rel (median/max)",
                      f"{e['mean_rel']['median']:.4f}/{e['mean_rel']['max']:.4f}",
                      f"hidden {e['hidden_rel_err']:.3f}, cos {e['sentence_cos']:.4f}"))
    write("qlora", report, table)


if __name__ == "__main__":
    main()
