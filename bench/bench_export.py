"""Export benchmark: peftfx export_onnx vs the Hugging Face route (PEFT merge_and_unload + torch.onnx.export) on the
same trained LoRA model, and ONNX Runtime vs PyTorch eager, in one process.

    python bench/bench_export.py [--repeats 10] [--threads 1]

(One thread by default: on a shared 2-core machine, 2-thread PyTorch eager collapses when another process takes a
core — every elementwise op waits out a scheduler slice at the OpenMP barrier — which measures the neighbours.)

Model: Llama-shaped, 4 layers, hidden 512, vocab 32000, LoRA r=8 on q and v (B random: a "trained" adapter).
  * export time and file size: peftfx merged, peftfx base model, peftfx adapter-input model, HF route
  * latency (batch 1 and 8 × sequence 128; medians of interleaved repeats): PyTorch eager (merged), ORT merged,
    ORT base (merged / base must be ≤ 1.02: merging adds nothing), ORT adapter-input model with the adapter active
    (overhead of serving adapters unmerged), ORT of the HF-route file
  * generation: one decode step with the key/value cache at past lengths 32 → 512 (flat) against recomputing the
    whole sequence without a cache (grows with the length)
Results: bench/results/export.{json,md}; ORT sessions use the same thread count, without spin-waiting.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import interleaved, write  # noqa: E402


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftfx
    from peftfx import LoRA, select

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=512, intermediate_size=1376,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                                        max_position_embeddings=1024)).eval()
    ids = torch.randint(0, 32000, (2, 16))
    pm = peftfx.apply(base, LoRA(rank=8, alpha=16, targets=select.role("attn.q") | select.role("attn.v")),
                      {"input_ids": ids})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return base, pm.eval(), ids


def hf_route(base, pm, ids, path):
    """HF PEFT on a copy of the same base with the same A/B, merge_and_unload, torch.onnx.export (dynamo)."""
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                        lora_dropout=0.0))
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                ours = pm.get_submodule(name.replace("base_model.model.", "", 1) + ".lora")
                mod.lora_A["default"].weight.copy_(ours.lora_A)
                mod.lora_B["default"].weight.copy_(ours.lora_B)
    t0 = time.perf_counter()
    merged = hf.merge_and_unload().eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(merged, (), path, kwargs={"input_ids": ids, "use_cache": False}, dynamo=True,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "use_cache": None},
                          external_data=False, verbose=False, input_names=["input_ids"], output_names=["logits"])
    return time.perf_counter() - t0, merged


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    from peftfx import export_onnx

    base, pm, ids = build()
    d = tempfile.mkdtemp(prefix="peftfx-bench-export-")
    paths = {k: os.path.join(d, f"{k}.onnx") for k in ("merged", "base", "adapter_inputs", "kv", "hf")}
    t_export, reports = {}, {}
    for key, kw in (("merged", {}), ("base", {}), ("adapter_inputs", {"adapter_inputs": True}),
                    ("kv", {"kv_cache": True, "source": base})):
        t0 = time.perf_counter()
        reports[key] = export_onnx(base if key == "base" else pm, paths[key], {"input_ids": ids}, **kw)
        t_export[key] = time.perf_counter() - t0
    t_export["hf"], hf_merged = hf_route(base, pm, ids, paths["hf"])
    sizes = {k: os.path.getsize(p) for k, p in paths.items()}
    results = {"threads": args.threads, "export_s": t_export, "size_bytes": sizes,
               "peftfx_export_stages_s": reports["merged"].stages,
               "parity_max_abs": {k: r.max_abs for k, r in reports.items()}}
    results.update(latency(pm, paths, args))
    results["generation"] = generation(paths, args)
    results["hf_route_parity_max_abs"] = hf_parity(hf_merged, pm, paths["hf"], args.threads)
    _table(results)


def _session(path, threads, adapter_from=None):
    from peftfx.export import Runtime, write_onnx_adapter

    rt = Runtime(path, device="cpu", threads=threads, spin=False)
    if adapter_from is not None:
        f = write_onnx_adapter(adapter_from, path.replace(".onnx", ".onnx_adapter"), model=path)
        rt.load_adapter("trained", f)
    return rt


def latency(pm, paths, args):
    sessions = {k: _session(paths[k], args.threads, pm if k == "adapter_inputs" else None)
                for k in ("merged", "base", "adapter_inputs", "hf")}
    import peftfx

    merged = peftfx.merge(pm).eval()
    out = {}
    for batch in (1, 8):
        x = torch.randint(0, 32000, (batch, 128), generator=torch.Generator().manual_seed(batch))
        xn = x.numpy()

        def eager():
            with torch.inference_mode():
                merged(input_ids=x)

        fns = {"pytorch_eager_merged": eager,
               "ort_merged": lambda: sessions["merged"].run(input_ids=xn),
               "ort_base": lambda: sessions["base"].run(input_ids=xn),
               "ort_adapter_inputs": lambda: sessions["adapter_inputs"].run({"input_ids": xn}, adapter="trained"),
               "ort_hf_route": lambda: sessions["hf"].run(input_ids=xn)}
        med = interleaved(fns, repeats=args.repeats, warmup=2)
        out[f"latency_b{batch}_s128"] = med
        out[f"ratios_b{batch}_s128"] = {
            "ort_merged/pytorch_eager": med["ort_merged"] / med["pytorch_eager_merged"],
            "ort_merged/ort_base": med["ort_merged"] / med["ort_base"],
            "ort_adapter_inputs/ort_merged": med["ort_adapter_inputs"] / med["ort_merged"],
            "ort_merged/ort_hf_route": med["ort_merged"] / med["ort_hf_route"]}
    return out


def generation(paths, args):
    """Median seconds of one cached decode step at past length P, and of a no-cache forward over P + 1 tokens."""
    kv = _session(paths["kv"], args.threads)
    full = _session(paths["merged"], args.threads)
    width = kv.kv["kv_heads"] * kv.kv["head_dim"]
    out = {}
    for past_len in (32, 128, 512):
        prompt = np.random.default_rng(past_len).integers(0, 32000, (1, past_len), dtype=np.int64)
        empty = {n: np.zeros((1, 0, width), np.float32) for n in kv.kv["inputs"]}
        pre = kv.run({"input_ids": prompt, **empty})
        past = {i: pre[o] for i, o in zip(kv.kv["inputs"], kv.kv["outputs"])}
        step = {"input_ids": np.array([[7]], dtype=np.int64), **past}
        whole = np.concatenate([prompt, [[7]]], axis=1)
        med = interleaved({"cached_step": lambda: kv.run(step), "no_cache_forward": lambda: full.run(input_ids=whole)},
                          repeats=args.repeats, warmup=2)
        out[f"past_{past_len}"] = med
    return out


def hf_parity(hf_merged, pm, path, threads):
    x = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = pm(input_ids=x).logits.numpy(), hf_merged(input_ids=x, use_cache=False).logits.numpy()
    got = _session(path, threads).run(input_ids=x.numpy())["logits"]
    return {"hf_onnx_vs_peftfx_pytorch": float(np.abs(got - ours).max()),
            "hf_pytorch_vs_peftfx_pytorch": float(np.abs(theirs - ours).max())}


def _table(r):
    ms = lambda s: f"{1e3 * s:.2f}"  # noqa: E731
    rows = [("measure", "peftfx", "HF route / reference", "ratio")]
    rows.append(("export time (s)", f"{r['export_s']['merged']:.2f}", f"{r['export_s']['hf']:.2f}",
                 f"{r['export_s']['merged'] / r['export_s']['hf']:.2f} (peftfx includes ORT verification)"))
    rows.append(("file size (MB)", f"{r['size_bytes']['merged'] / 1e6:.1f}", f"{r['size_bytes']['hf'] / 1e6:.1f}",
                 f"{r['size_bytes']['merged'] / r['size_bytes']['hf']:.3f}"))
    for b in (1, 8):
        lat, q = r[f"latency_b{b}_s128"], r[f"ratios_b{b}_s128"]
        rows.append((f"b{b}×128 ORT merged vs PyTorch eager (ms)", ms(lat["ort_merged"]),
                     ms(lat["pytorch_eager_merged"]), f"{q['ort_merged/pytorch_eager']:.3f}"))
        rows.append((f"b{b}×128 ORT merged vs ORT base (ms)", ms(lat["ort_merged"]), ms(lat["ort_base"]),
                     f"{q['ort_merged/ort_base']:.3f}"))
        rows.append((f"b{b}×128 ORT adapter inputs vs merged (ms)", ms(lat["ort_adapter_inputs"]),
                     ms(lat["ort_merged"]), f"{q['ort_adapter_inputs/ort_merged']:.3f}"))
        rows.append((f"b{b}×128 ORT merged vs HF-route file (ms)", ms(lat["ort_merged"]), ms(lat["ort_hf_route"]),
                     f"{q['ort_merged/ort_hf_route']:.3f}"))
    for k, v in r["generation"].items():
        rows.append((f"decode step, {k.replace('_', ' ')} (ms): cached vs no-cache", ms(v["cached_step"]),
                     ms(v["no_cache_forward"]), f"{v['cached_step'] / v['no_cache_forward']:.3f}"))
    rows.append(("adapter-input / kv / base export (s)", f"{r['export_s']['adapter_inputs']:.2f} / "
                 f"{r['export_s']['kv']:.2f} / {r['export_s']['base']:.2f}", "", ""))
    rows.append(("parity max abs (merged, HF file vs ours)", f"{r['parity_max_abs']['merged']:.1e}",
                 f"{r['hf_route_parity_max_abs']['hf_onnx_vs_peftfx_pytorch']:.1e}", ""))
    write("export", r, rows)


if __name__ == "__main__":
    main()
