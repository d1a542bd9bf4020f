"""Where a float32 ONNX file's time goes in ONNX Runtime (CPU, 1 thread) against PyTorch eager, on all-MiniLM-L6-v2:
the evidence behind issue 13's float32 targets (≤ 0.75× eager at 1×128, ≤ 0.8× at 8×128).

    python bench/bench_ort_fp32.py [--repeats 15]

Parts (every comparison interleaved A B C …, then reversed; medians; torch and ORT at 1 thread, ORT sessions with
``session.intra_op.allow_spinning=0``; ``OMP_WAIT_POLICY=PASSIVE`` as in bench_export.py):
  * gemm: MiniLM's weight products at 128 rows (1×128) and 1024 rows (8×128) — 384→1152 (q/k/v packed, as in ORT's
    ``Attention``), 384→384, 384→1536, 1536→384 — as ORT ``MatMul`` + ``Add``, ``Gemm`` with bias (weight as is and
    stored transposed, ``transB=1``), ``FusedMatMul`` + ``Add``, against ``torch.nn.functional.linear`` (MKL sgemm);
    GFLOP/s. The same product cannot be made faster by choosing another op if all of these run at one speed.
  * attention: one MiniLM attention block with its q/k/v projection (hidden 384, 12 heads × 32): ORT ``Attention``
    (additive 4-D bias, 2-D ``mask_index``, no mask), ``MatMul`` + ``Split`` + ``MultiHeadAttention``, against torch
    ``linear`` + ``scaled_dot_product_attention`` (with and without the mask).
  * model: the real all-MiniLM-L6-v2 (random LoRA r=8 on q/v, merged; the speed does not depend on the values)
    exported with ``optimize="all"``, interleaved with eager PyTorch and with the model's weight products alone
    (6 layers × q/k/v packed 384→1152, 384→384, 384→1536, 1536→384; same shapes and weight bytes, nothing else) in
    ORT (``MatMul``, outputs left in ORT through I/O binding) and in torch (``linear``, no bias): the ORT row of
    those over eager is the *GEMM floor* — the lowest ratio any rewrite that keeps float32 GEMMs can reach — and the
    torch row is eager's own GEMM share. ORT's own profile per op type at 1×128 and 8×128 beside it.
  * options: session settings on that file (graph optimisation level basic / extended, ``set_denormal_as_zero``,
    no memory arena/pattern, no weight prepacking) and ``FastGelu`` (tanh approximation) in place of ``BiasGelu``
    (speed and the logit change), each as a ratio to the default session.
Results: bench/results/ort_fp32.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")         # before torch loads (see bench_export.py)

import argparse
import collections
import json
import math
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import interleaved, write

HIDDEN, HEADS, FFN, SEQ = 384, 12, 1536, 128


def _session(model, **cfg):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
    o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if "level" in cfg:
        o.graph_optimization_level = cfg.pop("level")
    if cfg.pop("arena", True) is False:
        o.enable_cpu_mem_arena = o.enable_mem_pattern = False
    if cfg.pop("profile", False):
        o.enable_profiling = True
        o.profile_file_prefix = os.path.join(tempfile.gettempdir(), "peftfx_ort_fp32_profile")
    for k, v in cfg.items():
        o.add_session_config_entry(k, v)
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    return ort.InferenceSession(data, o, providers=["CPUExecutionProvider"])


def _graph(nodes, inputs, inits):
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def gemm(repeats):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = {}
    for rows in (128, 1024):
        for k, n in ((HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, FFN), (FFN, HIDDEN)):
            w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
            b = rng.standard_normal(n).astype(np.float32)
            x = rng.standard_normal((rows, k)).astype(np.float32)
            xi = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])]
            wi, bi = numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")
            wt = numpy_helper.from_array(np.ascontiguousarray(w.T), "W")
            models = {
                "ort_matmul_add": _graph([helper.make_node("MatMul", ["x", "W"], ["t"]),
                                          helper.make_node("Add", ["t", "b"], ["y"])], xi, [wi, bi]),
                "ort_gemm_bias": _graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"])], xi, [wi, bi]),
                "ort_gemm_transB": _graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], xi, [wt, bi]),
                "ort_fusedmatmul_add": _graph([helper.make_node("FusedMatMul", ["x", "W"], ["t"], domain="com.microsoft"),
                                               helper.make_node("Add", ["t", "b"], ["y"])], xi, [wi, bi])}
            sessions = {name: _session(m) for name, m in models.items()}
            fns = {name: (lambda s=s, x=x: s.run(None, {"x": x})) for name, s in sessions.items()}
            tw, tb, tx = torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(b), torch.from_numpy(x)

            def linear(tw=tw, tb=tb, tx=tx):
                with torch.inference_mode():
                    torch.nn.functional.linear(tx, tw, tb)

            fns["torch_linear"] = linear
            med = interleaved(fns, repeats=repeats * 2, warmup=3)
            flop = 2 * rows * k * n
            out[f"{rows}x{k}x{n}"] = {name: {"ms": 1e3 * t, "gflops": flop / t / 1e9,
                                             "vs_torch": t / med["torch_linear"]} for name, t in med.items()}
    return out


def attention(repeats):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((HIDDEN, 3 * HIDDEN)) * 0.05).astype(np.float32)
    b = (rng.standard_normal(3 * HIDDEN) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    x_i = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])
    bias_i = helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["B", 1, "S", "S"])
    mask_i = helper.make_tensor_value_info("mask", TensorProto.INT32, ["B", "S"])
    split = [numpy_helper.from_array(np.array([HIDDEN] * 3, np.int64), "sp")]

    def att(inputs):
        return [helper.make_node("Attention", ["x", "W", "b", *inputs], ["y"], domain="com.microsoft", num_heads=HEADS)]

    def mha(bias):
        return [helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Add", ["t", "b"], ["t2"]),
                helper.make_node("Split", ["t2", "sp"], ["q", "k", "v"], axis=2),
                helper.make_node("MultiHeadAttention", ["q", "k", "v", *(["", "", "bias"] if bias else [])], ["y"],
                                 domain="com.microsoft", num_heads=HEADS)]

    sessions = {"ort_attention_bias4d": _session(_graph(att(["", "", "bias"]), [x_i, bias_i], inits)),
                "ort_attention_mask2d": _session(_graph(att(["mask"]), [x_i, mask_i], inits)),
                "ort_attention_nomask": _session(_graph(att([]), [x_i], inits)),
                "ort_matmul_mha_bias4d": _session(_graph(mha(True), [x_i, bias_i], inits + split)),
                "ort_matmul_mha_nomask": _session(_graph(mha(False), [x_i], inits + split))}
    tw, tb = torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(b)
    out = {}
    for batch in (1, 8):
        x = rng.standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)
        feeds = {"x": x, "bias": np.zeros((batch, 1, SEQ, SEQ), np.float32), "mask": np.ones((batch, SEQ), np.int32)}
        fns = {k: (lambda s=s, f=feeds: s.run(None, {i.name: f[i.name] for i in s.get_inputs()}))
               for k, s in sessions.items()}
        tx, tmask = torch.from_numpy(x), torch.zeros(batch, 1, SEQ, SEQ)

        def sdpa(mask, tx=tx, tmask=tmask, batch=batch):
            with torch.inference_mode():
                q, k, v = torch.nn.functional.linear(tx, tw, tb).view(batch, SEQ, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tmask if mask else None)
                o.transpose(1, 2).reshape(batch, SEQ, HIDDEN)

        fns["torch_linear_sdpa_mask"] = lambda sdpa=sdpa: sdpa(True)
        fns["torch_linear_sdpa_nomask"] = lambda sdpa=sdpa: sdpa(False)
        med = interleaved(fns, repeats=repeats * (2 if batch == 1 else 1), warmup=2)
        out[f"b{batch}"] = {k: {"ms": 1e3 * t, "vs_torch": t / med["torch_linear_sdpa_mask"]} for k, t in med.items()}
    return out


def minilm_file(d):
    import peftfx
    from peftfx import LoRA, select
    from peftfx.quickstart import load_minilm

    torch.manual_seed(0)
    base, tok = load_minilm(5)
    enc = tok(["one sentence", "and another one"], padding="max_length", max_length=16, return_tensors="pt")
    ex = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    pm = peftfx.apply(base, LoRA(rank=8, alpha=16, targets=select.role("attn.q") | select.role("attn.v")), ex)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    path = os.path.join(d, "minilm_all.onnx")
    report = peftfx.export_onnx(pm, path, ex, optimize="all")
    merged = peftfx.merge_and_unload(pm).eval()         # the original class, LoRA folded in: plain HF eager
    return path, merged, report


def _feeds(batch):
    g = torch.Generator().manual_seed(batch)
    return {"input_ids": torch.randint(0, 30000, (batch, SEQ), generator=g),
            "attention_mask": torch.ones(batch, SEQ, dtype=torch.long)}


def profile(path, batch, runs):
    """ORT's per-op-type kernel milliseconds per run (the first two runs dropped)."""
    s = _session(path, profile=True)
    feed = {k: v.numpy() for k, v in _feeds(batch).items()}
    for _ in range(runs + 2):
        s.run(None, feed)
    trace = s.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= starts[2]:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(per_op.most_common())


def _gemm_chain(layers=6):
    """MiniLM's weight products alone, in torch and as an ONNX file: per layer x·W_qkv (384→1152), x·W_o (384→384),
    h = x·W_up (384→1536), x' = h·W_down (1536→384) — the same shapes, flops and weight bytes as the model's
    (embeddings aside), nothing else."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    shapes = ((HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, FFN), (FFN, HIDDEN))
    ws = [[(rng.standard_normal(s) * 0.05).astype(np.float32) for s in shapes] for _ in range(layers)]
    nodes, inits, outs, x = [], [], [], "x0"
    for i, (wqkv, wo, wup, wdown) in enumerate(ws):
        for name, w in (("qkv", wqkv), ("o", wo), ("up", wup), ("down", wdown)):
            inits.append(numpy_helper.from_array(w, f"W{name}{i}"))
        nodes += [helper.make_node("MatMul", [x, f"Wqkv{i}"], [f"qkv{i}"]), helper.make_node("MatMul", [x, f"Wo{i}"], [f"o{i}"]),
                  helper.make_node("MatMul", [x, f"Wup{i}"], [f"h{i}"]),
                  helper.make_node("MatMul", [f"h{i}", f"Wdown{i}"], [f"x{i + 1}"])]
        outs += [f"qkv{i}", f"o{i}"]
        x = f"x{i + 1}"
    outs.append(x)
    g = helper.make_graph(nodes, "gemms", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["B", "S", HIDDEN])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    tws = [[torch.from_numpy(np.ascontiguousarray(w.T)) for w in layer] for layer in ws]

    def torch_chain(t):
        with torch.inference_mode():
            for wqkv, wo, wup, wdown in tws:
                torch.nn.functional.linear(t, wqkv)
                torch.nn.functional.linear(t, wo)
                t = torch.nn.functional.linear(torch.nn.functional.linear(t, wup), wdown)

    return m, outs, torch_chain


def model(path, merged, repeats):
    chain, chain_outs, torch_chain = _gemm_chain()
    out = {}
    for batch in (1, 8):
        x = _feeds(batch)
        s, sg = _session(path), _session(chain)
        xn = {k: v.numpy() for k, v in x.items()}
        h = np.random.default_rng(3).standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)
        th = torch.from_numpy(h)
        io = sg.io_binding()            # outputs stay ORT's (no copy into numpy): the products alone are timed
        io.bind_cpu_input("x0", h)
        for o in chain_outs:
            io.bind_output(o, "cpu")

        def eager(x=x):
            with torch.inference_mode():
                merged(**x)

        med = interleaved({"pytorch_eager": eager, "ort_all": lambda s=s, xn=xn: s.run(None, xn),
                           "ort_weight_gemms_only": lambda sg=sg, io=io: sg.run_with_iobinding(io),
                           "torch_weight_gemms_only": lambda th=th: torch_chain(th)}, repeats=repeats, warmup=2)
        del s, sg, io
        prof = profile(path, batch, 10 if batch == 1 else 4)
        e = med["pytorch_eager"]
        out[f"b{batch}"] = {"ms": {k: 1e3 * v for k, v in med.items()}, "vs_eager": {k: v / e for k, v in med.items()},
                            "profile_ms": {k: round(v, 3) for k, v in prof.items()},
                            "profile_total_ms": sum(prof.values())}
    return out


def options(path, repeats):
    import onnx
    import onnxruntime as ort

    proto = onnx.load(path)
    n = 0
    for node in proto.graph.node:
        if node.op_type == "BiasGelu" and node.domain == "com.microsoft":
            node.op_type, n = "FastGelu", n + 1
    fast = path.replace(".onnx", "_fastgelu.onnx")
    onnx.save(proto, fast)
    level = ort.GraphOptimizationLevel
    sessions = {"default": _session(path), "graph_level_basic": _session(path, level=level.ORT_ENABLE_BASIC),
                "graph_level_extended": _session(path, level=level.ORT_ENABLE_EXTENDED),
                "denormal_as_zero": _session(path, **{"session.set_denormal_as_zero": "1"}),
                "no_arena_no_mem_pattern": _session(path, arena=False),
                "no_prepacking": _session(path, **{"session.disable_prepacking": "1"}),
                f"fastgelu_for_biasgelu_x{n}": _session(fast)}
    x = np.linspace(-10, 10, 400001)
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    out = {"fastgelu_max_abs_vs_erf_gelu": float(np.abs(exact - tanh).max())}
    for batch in (1, 8):
        feed = {k: v.numpy() for k, v in _feeds(batch).items()}
        ref = sessions["default"].run(None, feed)[0]
        got = sessions[f"fastgelu_for_biasgelu_x{n}"].run(None, feed)[0]
        med = interleaved({k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()},
                          repeats=repeats * (2 if batch == 1 else 1), warmup=2)
        out[f"b{batch}"] = {k: {"ms": 1e3 * t, "vs_default": t / med["default"]} for k, t in med.items()}
        out[f"b{batch}"]["fastgelu_logits_max_abs_change"] = float(np.abs(got - ref).max())
        out[f"b{batch}"]["logits_max_abs"] = float(np.abs(ref).max())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    res = {"repeats": args.repeats, "threads": 1, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
           "load_average_start": os.getloadavg(), "torch_linear_backend": "MKL sgemm (aten::addmm)",
           "torch_attention": "aten::_scaled_dot_product_flash_attention_for_cpu"}
    res["gemm"] = gemm(args.repeats)
    res["attention"] = attention(args.repeats)
    with tempfile.TemporaryDirectory(prefix="peftfx-ort-fp32-") as d:
        path, merged, report = minilm_file(d)
        res["fused"] = report.optimize.get("fused")
        res["model"] = model(path, merged, args.repeats)
        res["options"] = options(path, args.repeats)
    res["load_average_end"] = os.getloadavg()
    rows = [("part", "case", "1×128 (or 128 rows)", "8×128 (or 1024 rows)")]
    for shape in (f"{HIDDEN}x{3 * HIDDEN}", f"{HIDDEN}x{HIDDEN}", f"{HIDDEN}x{FFN}", f"{FFN}x{HIDDEN}"):
        for k in res["gemm"][f"128x{shape}"]:
            a, b = res["gemm"][f"128x{shape}"][k], res["gemm"][f"1024x{shape}"][k]
            rows.append(("gemm " + shape.replace("x", "→"), k,
                         f"{a['ms']:.3f} ms, {a['gflops']:.0f} GFLOP/s ({a['vs_torch']:.2f}× torch)",
                         f"{b['ms']:.3f} ms, {b['gflops']:.0f} GFLOP/s ({b['vs_torch']:.2f}× torch)"))
    for k in res["attention"]["b1"]:
        a, b = res["attention"]["b1"][k], res["attention"]["b8"][k]
        rows.append(("attention block", k, f"{a['ms']:.3f} ms ({a['vs_torch']:.2f})", f"{b['ms']:.3f} ms ({b['vs_torch']:.2f})"))
    m1, m8 = res["model"]["b1"], res["model"]["b8"]
    for k in m1["ms"]:
        rows.append(("MiniLM, interleaved", f"{k} ms (× eager)", f"{m1['ms'][k]:.2f} ({m1['vs_eager'][k]:.2f})",
                     f"{m8['ms'][k]:.2f} ({m8['vs_eager'][k]:.2f})"))
    for op in list(m8["profile_ms"])[:6]:
        rows.append(("MiniLM ORT profile (all)", f"{op} ms (share)",
                     f"{m1['profile_ms'].get(op, 0):.2f} ({m1['profile_ms'].get(op, 0) / m1['profile_total_ms']:.0%})",
                     f"{m8['profile_ms'][op]:.2f} ({m8['profile_ms'][op] / m8['profile_total_ms']:.0%})"))
    o1, o8 = res["options"]["b1"], res["options"]["b8"]
    for k in o1:
        if isinstance(o1[k], dict):
            rows.append(("session option", k, f"{o1[k]['ms']:.2f} ({o1[k]['vs_default']:.3f})",
                         f"{o8[k]['ms']:.2f} ({o8[k]['vs_default']:.3f})"))
    rows.append(("FastGelu", "logits max |change| / max |logit|",
                 f"{o1['fastgelu_logits_max_abs_change']:.2g} / {o1['logits_max_abs']:.2g}",
                 f"{o8['fastgelu_logits_max_abs_change']:.2g} / {o8['logits_max_abs']:.2g}"))
    rows.append(("load average", "start → end", f"{res['load_average_start'][0]:.1f}", f"{res['load_average_end'][0]:.1f}"))
    write("ort_fp32", res, rows)
    print("\n".join(" | ".join(str(c) for c in r) for r in rows))


if __name__ == "__main__":
    main()
