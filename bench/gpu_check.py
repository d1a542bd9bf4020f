"""One command for someone with a GPU: which ONNX Runtime providers serve peftfx's files, parity and latency of
float32 / float16 / bfloat16 files on CUDA against PyTorch CUDA eager.

    python bench/gpu_check.py [--repeats 20] [--layers 4] [--hidden 512] [--seq 128] [--batch 1 8]

Runs on a CPU-only machine too: it then checks the float32 (and int8) files on the CPU provider against CPU eager and
says which GPU checks it skipped and why. Model: a Llama-shaped decoder (random init, LoRA r=8 on q and v with
random B), merged; every file is exported with ``export_onnx`` (verified there against PyTorch on CPU or CUDA).
Latency: medians of interleaved runs; CUDA timings synchronise (``torch.cuda.synchronize``; ORT's I/O binding
returns after the run). Prints a table and writes bench/results/gpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import RESULTS, interleaved  # noqa: E402


def _model(layers, hidden):
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftfx
    from peftfx import LoRA, select

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 2,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)).eval()
    ex = {"input_ids": torch.randint(0, 32000, (2, 16))}
    pm = peftfx.apply(base, LoRA(rank=8, alpha=16, targets=select.role("attn.q") | select.role("attn.v")), ex)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return pm.eval(), ex


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import onnxruntime as ort
    import transformers

    import peftfx
    from peftfx.export import Runtime, export_onnx, gpu_present
    from peftfx.export.runtime import provider_choice

    transformers.logging.set_verbosity_error()
    providers, why = provider_choice(None)
    cuda = providers[0] == "CUDAExecutionProvider" and torch.cuda.is_available()
    res = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
           "gpu_present": gpu_present(), "torch_cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "provider_choice": providers, "provider_reason": why, "skipped": [], "files": {}, "latency": {}}
    if not cuda:
        res["skipped"] = [f"CUDA float32/float16/bfloat16 parity and latency vs PyTorch CUDA eager: {why}"
                          + ("" if torch.cuda.is_available() else "; torch sees no CUDA device")]
    pm, ex = _model(args.layers, args.hidden)
    merged = peftfx.merge(pm).eval()
    d = tempfile.mkdtemp(prefix="peftfx-gpu-check-")
    device = "cuda" if cuda else "cpu"
    dtypes = ["float32", "float16", "bfloat16"] if cuda else ["float32", "int8"]
    sessions = {}
    for dt in dtypes:
        path = os.path.join(d, f"{dt}.onnx")
        try:
            q = {"on_fail": "warn"} if dt == "int8" else None      # report the accuracy, do not refuse
            r = export_onnx(pm, path, ex, dtype=dt, device=device, quantization=q)
        except peftfx.PeftfxError as e:
            res["files"][dt] = {"error": str(e)[:300]}
            continue
        rt = Runtime(path, device=device)
        sessions[dt] = rt
        res["files"][dt] = {"max_abs_vs_pytorch": r.max_abs, "tolerance": r.tolerance, "provider": rt.provider,
                            "io_binding": rt.io_binding, "fused": r.optimize.get("fused"),
                            "quantization": r.quantization, "size_mb": r.size_bytes / 1e6}
    eager = {"float32": merged.to(device)}
    if cuda:
        eager["float16"] = peftfx.merge(pm).eval().to(device=device, dtype=torch.float16)
        eager["bfloat16"] = peftfx.merge(pm).eval().to(device=device, dtype=torch.bfloat16)
    for b in args.batch:
        x = torch.randint(0, 32000, (b, args.seq), generator=torch.Generator().manual_seed(b))
        xd, xn = x.to(device), x.numpy()
        fns = {}
        for dt, m in eager.items():
            def run_eager(m=m, xd=xd):
                with torch.inference_mode():
                    m(input_ids=xd, use_cache=False)
                if cuda:
                    torch.cuda.synchronize()
            fns[f"pytorch_{dt}"] = run_eager
        for dt, rt in sessions.items():
            fns[f"ort_{dt}"] = lambda rt=rt, xn=xn: rt.run(input_ids=xn)
        if cuda:        # parity of each ORT file with PyTorch CUDA eager in the same dtype
            for dt, rt in sessions.items():
                with torch.inference_mode():
                    ref = eager.get(dt, eager["float32"])(input_ids=xd, use_cache=False).logits.float().cpu().numpy()
                got = rt.run(input_ids=xn)["logits"]
                res["files"][dt][f"max_abs_vs_cuda_eager_b{b}"] = float(np.abs(got - ref).max())
        med = interleaved(fns, repeats=args.repeats, warmup=3)
        res["latency"][f"{b}x{args.seq}"] = {k: 1e3 * v for k, v in med.items()}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, ".gpu_check.json.tmp"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    os.replace(os.path.join(RESULTS, ".gpu_check.json.tmp"), os.path.join(RESULTS, "gpu_check.json"))
    print(f"onnxruntime {res['onnxruntime']}  providers {res['available_providers']}  GPU {res['gpu']}")
    print(f"Runtime uses {providers[0]}: {why}")
    for s in res["skipped"]:
        print(f"SKIPPED: {s}")
    for dt, info in res["files"].items():
        print(f"{dt:9s} " + json.dumps(info, default=str))
    for shape, lat in res["latency"].items():
        print(f"{shape}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in lat.items()))


if __name__ == "__main__":
    main()
