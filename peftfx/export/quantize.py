"""int8 and bfloat16 files for :func:`~peftfx.export.export_onnx` (``dtype="int8"`` / ``dtype="bfloat16"``).

int8 (CPU): the merged model is exported, fused and verified in float32 first (tolerance 1e-4, as every export);
that verified file is then quantized with ONNX Runtime's quantizer — ``quantize_dynamic`` (weights int8 per tensor
or per output channel, activations quantized per call: ``DynamicQuantizeLinear`` + ``MatMulInteger``) or, given a
calibration set, ``quantize_static`` (QDQ format, activation ranges from the calibration inputs, MinMax). The int8
file is then run on the verification inputs (the example at batch 1, batch + 1 at one token and at twice the length)
and compared with the PyTorch model: ``max_abs`` (max |int8 − PyTorch| over every float output), ``max_rel``
(that over max |PyTorch|) and ``argmax_agreement`` (fraction of rows/positions whose argmax over the last axis is
the same; logits' predicted class or next token). Past ``Int8.max_rel`` or under ``Int8.min_agreement`` the export
raises :class:`~peftfx.ExportError` and writes nothing (``on_fail="warn"``: warns and writes). Defaults: max_rel
0.1, min_agreement 0.95 — int8 rounds each weight to 1/254 of its row's (or tensor's) range, so logits move by a
few percent of their scale; agreement is lowest on random, untrained models whose top logits nearly tie.

bfloat16 (CUDA only; ONNX Runtime's CPU provider has no bfloat16 kernels for matmuls): the float16 conversion's
graph (inputs and outputs kept float32, casts at the boundary) with every float16 tensor, cast and initializer
turned into bfloat16.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .._errors import ExportError

__all__ = ["Int8", "int8_accuracy", "quantize_file", "serving_args", "set_dtype", "to_bfloat16", "to_int8"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8:
    """How ``dtype="int8"`` quantizes and what it accepts.

    ``calibration``: a list of input dicts (numpy arrays or tensors, the graph's input names) → static int8;
    ``None`` → dynamic. ``per_channel``: one scale per output channel of each weight (default; measured on
    MiniLM: argmax agreement 0.95 → 0.975 at the same speed). ``keep_float``: weight matmuls whose simulated int8
    error (relative rms of the product, measured on the calibration set or else the verification inputs, see
    :mod:`peftfx.export._int8_sites`) exceeds it stay float32; ``None`` quantizes every weight matmul.
    ``min_agreement`` / ``max_rel``: accuracy the int8 file must keep against PyTorch on the verification inputs.
    ``on_fail``: ``"raise"`` (nothing written) or ``"warn"``."""

    calibration: Sequence[Mapping[str, Any]] | None = None
    per_channel: bool = True
    keep_float: float | None = 0.05
    min_agreement: float = 0.95
    max_rel: float = 0.1
    on_fail: str = "raise"

    @property
    def mode(self) -> str:
        return "dynamic" if self.calibration is None else "static"

    def check(self) -> Int8:
        if self.on_fail not in ("raise", "warn"):
            raise ExportError(f"Int8.on_fail must be 'raise' or 'warn', got {self.on_fail!r}.")
        if not 0.0 <= float(self.min_agreement) <= 1.0:
            raise ExportError(f"Int8.min_agreement is a fraction in [0, 1], got {self.min_agreement!r}.")
        if not float(self.max_rel) > 0:
            raise ExportError(f"Int8.max_rel must be > 0, got {self.max_rel!r}.")
        if self.keep_float is not None and not float(self.keep_float) > 0:
            raise ExportError(f"Int8.keep_float is an error threshold > 0 (or None: quantize every weight matmul), "
                              f"got {self.keep_float!r}.")
        cal = self.calibration
        if cal is not None and (isinstance(cal, Mapping) or not len(cal) or not all(isinstance(c, Mapping) for c in cal)):
                raise ExportError("Int8.calibration must be a non-empty list of input dicts, e.g. "
                                  "[{'input_ids': ids, 'attention_mask': mask}, ...].")
        return self

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration"] = None if self.calibration is None else len(self.calibration)
        d["max_rel_allowed"] = d.pop("max_rel")
        return d | {"mode": self.mode}


def as_int8(spec: Int8 | Mapping | None) -> Int8:
    """``export_onnx(quantization=…)``: an :class:`Int8`, a dict of its fields, or None (defaults)."""
    if spec is None:
        return Int8()
    if isinstance(spec, Int8):
        return spec.check()
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(Int8.__dataclass_fields__)
        if unknown:
            raise ExportError(f"quantization has unknown field(s) {sorted(unknown)}; fields: "
                              f"{sorted(Int8.__dataclass_fields__)}.")
        return Int8(**spec).check()
    raise ExportError(f"quantization must be an Int8(...) or a dict of its fields, got {type(spec).__name__}.")


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of input dicts."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], names: list[str], dtypes: dict[str, Any]):
        self.rows = [{k: _numpy(v).astype(dtypes[k]) for k, v in r.items() if k in names} for r in rows]
        missing = [n for n in names if n not in self.rows[0]]
        if missing:
            raise ExportError(f"the int8 calibration inputs lack {missing}; every row needs all of {names}.")
        self.i = 0

    def get_next(self):
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return self.rows[self.i - 1]

    def rewind(self):
        self.i = 0


def quantize_file(src: str, dst: str, cfg: Int8, feeds: Sequence[Mapping[str, np.ndarray]] = (),
                  metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Quantize the float32 ONNX file ``src`` into ``dst`` (dynamic or static int8, per ``cfg``): its weight matmuls
    only (:func:`~peftfx.export._int8_sites.weight_matmuls`), less those whose int8 error on ``feeds`` (the inputs to
    measure sensitivity on; the calibration set when there is one) exceeds ``cfg.keep_float``. ORT ``Attention``
    nodes are first unpacked so their q/k/v projection is such a matmul
    (:func:`~peftfx.export._int8_sites.expose_attention_projections`). ``metadata``: entries written into ``dst``'s
    metadata. Returns ``{"quantized": n, "kept_float": {node: error}, "sensitivity": {node: error}, "quantizer":
    "peftfx" | "onnxruntime"}`` (errors measured only when ``cfg.keep_float`` is set).

    Dynamic int8 is written by :func:`quantize_dynamic_matmuls` — the graph ONNX Runtime's ``quantize_dynamic``
    writes for these matmuls, computed with whole-array numpy instead of its per-channel Python loop, in memory (the
    file is read once and written once, no shape-inference round trip); where that does not apply (see there) and
    for static int8, ONNX Runtime's quantizer writes the file (``PEFTFX_INT8_ORT=1`` in the environment: always, to
    compare)."""
    import onnx

    from ._int8_sites import name_nodes, sensitivity, weight_matmuls

    proto, split = _load_for_int8(src)
    name_nodes(proto)
    nodes = [n.name for n in weight_matmuls(proto)]
    info: dict[str, Any] = {"kept_float": {}, "attention_unpacked": split}
    arrays: dict[str, np.ndarray] = {}      # the weights as numpy, read once (sensitivity, then the int8 writer)
    rows = feeds
    if cfg.calibration is not None:
        from .runtime import Runtime

        rt = Runtime(src, device="cpu", spin=False)
        names = list(rt._required)
        reader = _Reader(cfg.calibration, names, {n: rt.input_dtype(n) for n in names})
        rows = reader.rows
    try:
        if cfg.keep_float is not None and rows:
            with _one_blas_thread(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                errors = sensitivity(proto, rows, cfg.per_channel, static=cfg.calibration is not None, nodes=nodes,
                                     arrays=arrays)
            info["sensitivity"] = {k: round(v, 5) for k, v in sorted(errors.items(), key=lambda kv: -kv[1])}
            info["kept_float"] = {k: v for k, v in info["sensitivity"].items() if v > cfg.keep_float}
    except Exception as e:
        raise ExportError(f"the int8 sensitivity run failed: {_why(e)}") from e
    chosen = [n for n in nodes if n not in info["kept_float"]]
    info["quantized"] = len(chosen)
    if not chosen:
        raise ExportError(f"no weight matmul is left to quantize (the file has {len(nodes)}; "
                          f"Int8.keep_float={cfg.keep_float} keeps every one in float32): raise keep_float "
                          "or set it to None, or export dtype='float32'.")
    if cfg.calibration is None and os.environ.get("PEFTFX_INT8_ORT", "0") != "1":
        try:
            done = quantize_dynamic_matmuls(proto, chosen, cfg.per_channel, arrays)
            if done:
                from .adapters import _set_meta

                for k, v in (metadata or {}).items():
                    _set_meta(proto, k, v)
                onnx.save(proto, dst)
        except Exception as e:
            raise ExportError(f"peftfx's int8 writer failed: {_why(e)}. PEFTFX_INT8_ORT=1 in the "
                              "environment uses ONNX Runtime's quantizer instead; please report the model.") from e
        if done:
            info["quantizer"] = "peftfx"
            return info
    info["quantizer"] = "onnxruntime"
    _ort_quantize(proto, src, dst, cfg, chosen, reader if cfg.calibration is not None else None)
    if metadata:
        from .adapters import _set_meta

        q = onnx.load(dst)
        for k, v in metadata.items():
            _set_meta(q, k, v)
        onnx.save(q, dst)
    return info


def _load_for_int8(src: str):
    """The float32 file as a ModelProto without value_info (fused graphs keep shapes that onnx's re-inference, run
    by ORT's quantizer, disputes), ORT ``Attention`` nodes unpacked; (proto, number unpacked). Read once: through
    onnx_ir only when there is an ``Attention`` node to rewrite."""
    import onnx

    from ._int8_sites import expose_attention_projections

    proto = onnx.load(src)          # external data (a .data file beside src) is read in too
    split = 0
    if any(n.op_type == "Attention" and n.domain == "com.microsoft" for n in proto.graph.node):
        import onnx_ir as ir

        model = ir.from_proto(proto)
        del proto
        split = expose_attention_projections(model)
        proto = ir.to_proto(model)
        del model
    del proto.graph.value_info[:]
    return proto, split


def _ort_quantize(proto, src: str, dst: str, cfg: Int8, chosen: list[str], reader) -> None:
    """ONNX Runtime's quantizer (static int8, and dynamic where :func:`quantize_dynamic_matmuls` does not apply)."""
    import onnx
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src = src[:-len(".onnx")] + ".noshapes.onnx"
    onnx.save(proto, src)
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT,   # outputs of ORT's fused ops have no inferred type
             "MatMulConstBOnly": True}
    ql = logging.getLogger()          # ORT's quantizer logs "consider pre-processing" on the root logger
    level = ql.level
    ql.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if cfg.calibration is None:
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
                                 op_types_to_quantize=["MatMul"], nodes_to_quantize=chosen, extra_options=extra)
            else:
                quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, extra_options=extra,
                                op_types_to_quantize=["MatMul"], nodes_to_quantize=chosen)
    except Exception as e:  # ORT's quantizer raises its own types
        raise ExportError(f"ONNX Runtime's int8 quantizer failed ({cfg.mode}): {_why(e)}") from e
    finally:
        ql.setLevel(level)
        os.remove(src)


def _int8_weight(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of a float32 weight [in, out], one scale per output column (or one for the tensor), by the
    formulas of ONNX Runtime's quantizer, step for step in the same dtypes: range [min(w, 0), max(w, 0)],
    ``absmax`` of its ends, ``scale = float32((absmax − (−absmax)) / 254)`` computed in float64 (a scale under
    float32's smallest normal → 1.0), ``q = clip(round_half_even(w / scale), −128, 127)`` divided in float32;
    zero point 0. Returns (q int8 [in, out], scales float32 [out] or [])."""
    w = np.asarray(w, dtype=np.float32)
    lo = np.minimum(w.min(axis=0) if per_channel else w.min(), np.float32(0))
    hi = np.maximum(w.max(axis=0) if per_channel else w.max(), np.float32(0))
    absmax = np.maximum(np.abs(lo), np.abs(hi))
    scale64 = (absmax.astype(np.float64) - (-absmax).astype(np.float64)) / np.float64(254.0)
    scale = np.where(scale64 < np.finfo(np.float32).tiny, np.float32(1.0), scale64.astype(np.float32))
    scale = np.asarray(scale, dtype=np.float32)
    q = np.round(w / scale)
    np.clip(q, -128, 127, out=q)
    return q.astype(np.int8), scale


def quantize_dynamic_matmuls(proto, nodes: Sequence[str], per_channel: bool,
                             arrays: Mapping[str, np.ndarray] | None = None) -> bool:
    """Dynamic int8 of the weight matmuls ``nodes`` of ``proto`` (a float32 ModelProto, modified in place): per
    node ``x @ W`` → ``DynamicQuantizeLinear(x)`` (uint8, scale and zero point of each call's range; one per
    activation, shared by its consumers) → ``MatMulInteger(x_q, W_q, x_zero_point, W_zero_point)`` → ``Cast``
    float → ``Mul`` by ``x_scale · W_scale`` (a second ``Mul``), with ``W_q`` from :func:`_int8_weight` — the nodes,
    names, initializers and their order that ONNX Runtime's ``quantize_dynamic`` (``op_types_to_quantize=
    ["MatMul"]``, ``nodes_to_quantize=nodes``, int8 weights, ``MatMulConstBOnly``) writes, so the file runs to the
    same bits. Float initializers no node uses any more are dropped (as that quantizer does).

    Applies where every node is a ``MatMul`` whose first input is computed (not an initializer) and whose second is
    a 2-D float32 initializer, the default-domain opset is ≥ 11, no node holds a subgraph, the model is < 2 GB and
    no name it adds is taken. Otherwise returns False and leaves ``proto`` unchanged. ``arrays``: weights already
    read as numpy (name → array), not read again."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    wanted = set(nodes)
    inits = {t.name: t for t in graph.initializer}
    by_name = {n.name: n for n in graph.node if n.name in wanted}
    size = sum(int(np.prod(t.dims)) * 4 for t in graph.initializer)      # ≈ the bytes of the weights
    if opset < 11 or len(by_name) != len(wanted) or size > 2**31 - 2**27:
        return False
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return False
    taken = {o for n in graph.node for o in n.output} | {n.name for n in graph.node} | set(inits) \
        | {i.name for i in graph.input}
    new_names: set[str] = set()
    for n in by_name.values():
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2 or len(n.output) != 1:
            return False
        x, w = n.input
        t = inits.get(w)
        if not x or x in inits or t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2 \
                or t.data_location == TensorProto.EXTERNAL:
            return False
        q = n.name + "_quant"
        new_names |= {x + "_quantized", x + "_scale", x + "_zero_point", x + "_QuantizeLinear",
                      w + "_quantized", w + "_scale", w + "_zero_point", n.output[0] + "_output_quantized",
                      n.output[0] + "_output_quantized_cast_output", n.output[0] + "_output_quantized_cast",
                      q, q + "_scales_mul", q + "_scales_mul:0", q + "_output_scale_mul"}
    if new_names & taken:
        return False

    done_x: set[str] = set()
    done_w: set[str] = set()
    new_inits = []
    out_nodes = []
    for n in graph.node:
        if n.name not in wanted:
            out_nodes.append(n)
            continue
        x, w = n.input
        y = n.output[0]
        if x not in done_x:
            done_x.add(x)
            out_nodes.append(helper.make_node("DynamicQuantizeLinear", [x],
                                              [x + "_quantized", x + "_scale", x + "_zero_point"], x + "_QuantizeLinear"))
        if w not in done_w:
            done_w.add(w)
            arr = arrays[w] if arrays is not None and w in arrays else numpy_helper.to_array(inits[w])
            wq, scale = _int8_weight(arr, per_channel)
            dims = [int(wq.shape[1])] if per_channel else []
            new_inits += [helper.make_tensor(w + "_scale", TensorProto.FLOAT, dims, scale.reshape(-1).tolist()),
                          helper.make_tensor(w + "_zero_point", TensorProto.INT8, dims, [0] * int(scale.size)),
                          numpy_helper.from_array(wq, w + "_quantized")]
        q = n.name + "_quant"
        mm = y + "_output_quantized"
        out_nodes += [
            helper.make_node("MatMulInteger", [x + "_quantized", w + "_quantized", x + "_zero_point",
                                               w + "_zero_point"], [mm], q),
            helper.make_node("Cast", [mm], [mm + "_cast_output"], mm + "_cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [x + "_scale", w + "_scale"], [q + "_scales_mul:0"], q + "_scales_mul"),
            helper.make_node("Mul", [mm + "_cast_output", q + "_scales_mul:0"], [y], q + "_output_scale_mul")]
    graph.ClearField("node")
    graph.node.extend(out_nodes)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dropped = {t.name for t in graph.initializer} - used
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in dropped]):
        del graph.initializer[i]            # one by one: rebuilding the list would copy every weight
    for i in reversed([i for i, v in enumerate(graph.input) if v.name in dropped]):
        del graph.input[i]
    return True


def _why(e: Exception) -> str:
    """``Type: first line`` of an error, for a one-line ExportError."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


@contextlib.contextmanager
def _one_blas_thread():
    """numpy's BLAS on one thread while the sensitivity step multiplies its small activation × weight products:
    on a busy 2-core machine OpenBLAS's two threads wait on each other (a 118 × 1536 × 384 float32 product: 133 ms
    on 2 threads vs 5.6 ms on one, measured at load 6); each product's values are the same (BLAS splits the output
    between threads, not the sums). Without ``threadpoolctl`` nothing changes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _verification_feeds(plan: dict) -> list[dict[str, np.ndarray]]:
    """The export's verification inputs (the example at batch 1, batch + 1 short and long) as ONNX feeds."""
    from ._build import resize_inputs
    from ._verify import verification_cases

    axes = {n: plan["axes"][n] for n in plan["names"]}
    return [{k: _numpy(v) for k, v in resize_inputs(plan["inputs"], axes, sizes).items()}
            for _case, sizes in verification_cases(plan["inputs"], axes, plan.get("limits", {}))]


def int8_accuracy(path: str, pm, plan: dict, cfg: Int8) -> dict[str, Any]:
    """Run the int8 file and the PyTorch model on the verification inputs: max abs / rel error, argmax agreement;
    raise (or warn, per ``cfg.on_fail``) past the tolerance."""
    import torch

    from ._build import flatten_outputs, keep_modes, resize_inputs
    from ._verify import verification_cases
    from .runtime import Runtime

    rt = Runtime(path, device="cpu", spin=False)
    axes = {n: plan["axes"][n] for n in plan["names"]}
    worst_abs, worst_rel, agree, total = 0.0, 0.0, 0, 0
    with keep_modes(pm), torch.no_grad():
        pm.eval()
        for _case, sizes in verification_cases(plan["inputs"], axes, plan.get("limits", {})):
            x = resize_inputs(plan["inputs"], axes, sizes)
            ref = dict(flatten_outputs(pm(**x)))
            got = rt.run({k: v.detach().cpu().numpy() for k, v in x.items()})
            for name, key in zip(plan["out_names"], plan.get("out_keys", plan["out_names"])):
                if key not in ref or not ref[key].is_floating_point():
                    continue
                r, g = ref[key].float().cpu().numpy(), np.asarray(got[name], dtype=np.float32)
                err = float(np.abs(g - r).max()) if r.size else 0.0
                worst_abs = max(worst_abs, err)
                worst_rel = max(worst_rel, err / max(float(np.abs(r).max()) if r.size else 0.0, 1e-12))
                if r.ndim >= 2 and r.shape[-1] > 1:
                    same = r.argmax(-1) == g.argmax(-1)
                    agree, total = agree + int(same.sum()), total + same.size
    result = {"mode": cfg.mode, "per_channel": cfg.per_channel, "max_abs": worst_abs, "max_rel": worst_rel,
              "argmax_agreement": agree / total if total else None, "positions": total}
    bad = []
    if worst_rel > cfg.max_rel:
        bad.append(f"max rel error {worst_rel:.3g} > {cfg.max_rel:g}")
    if total and agree / total < cfg.min_agreement:
        bad.append(f"argmax agreement {agree / total:.3f} < {cfg.min_agreement:g}")
    result["ok"] = not bad
    if bad:
        msg = (f"the int8 model ({cfg.mode}) is too far from PyTorch on the verification inputs: {'; '.join(bad)} "
               f"(max abs {worst_abs:.3g}). Try Int8(per_channel=True), a calibration set (static int8) that "
               "resembles real inputs, a looser Int8(max_rel=…, min_agreement=…), or dtype='float32'.")
        if cfg.on_fail == "raise":
            raise ExportError(msg + " Nothing was written.")
        warnings.warn(msg, stacklevel=3)
    return result


def serving_args(dtype, optimize, device, quantization, kv_cache, adapter_inputs):
    """Checks of the serving options, before anything is traced: (optimize level, target, Int8 config or None)."""
    from .optimize import resolve_level

    level, target = resolve_level(optimize, dtype, device)
    if quantization is not None and dtype != "int8":
        raise ExportError(f"quantization=… applies to dtype='int8' only (dtype is {dtype!r}).")
    if dtype == "int8" and (kv_cache or adapter_inputs):
        raise ExportError("dtype='int8' exports a merged model without a key/value cache; kv_cache=True and "
                          "adapter_inputs=True are float32/float16 only (the quantizer would turn adapter inputs "
                          "into constants).")
    if dtype == "bfloat16":
        from .runtime import select_providers

        if "CUDAExecutionProvider" not in select_providers(None if device is None else device):
            raise ExportError("dtype='bfloat16' runs on ONNX Runtime's CUDA provider only (its CPU provider has no "
                              "bfloat16 matmul kernels), and none is usable here; use dtype='float16' on a GPU, "
                              "or 'float32'/'int8' on CPU.")
    return level, target, as_int8(quantization) if dtype == "int8" else None


def set_dtype(tmp: str, report, dtype: str, extra: dict | None = None) -> None:
    import onnx

    from .adapters import _set_meta

    proto = onnx.load(tmp)
    for k, v in ({"peftfx.dtype": dtype} | (extra or {})).items():
        _set_meta(proto, k, v)
    onnx.save(proto, tmp)
    report.dtype = dtype
    report.size_bytes = os.path.getsize(tmp)


def to_int8(tmp: str, pm, plan: dict, cfg, report, verify: bool, stages: dict) -> None:
    """Quantize the verified float32 file to int8 in place; check (and report) its accuracy against PyTorch."""
    t = time.perf_counter()
    qtmp = tmp[:-len(".onnx")] + ".int8.onnx"
    feeds = [] if cfg.calibration is not None or cfg.keep_float is None else _verification_feeds(plan)
    picked = quantize_file(tmp, qtmp, cfg, feeds,
                           metadata={"peftfx.dtype": "int8", "peftfx.int8": json.dumps(cfg.describe())})
    stages["int8"] = time.perf_counter() - t
    report.quantization = cfg.describe() | {"float32_bytes": report.size_bytes} | picked
    if verify:
        t = time.perf_counter()
        report.quantization.update(int8_accuracy(qtmp, pm, plan, cfg))
        stages["int8 check"] = time.perf_counter() - t
    os.replace(qtmp, tmp)
    if os.path.exists(tmp + ".data"):       # the int8 file holds its weights inline
        os.remove(tmp + ".data")
    report.dtype = "int8"
    report.size_bytes = os.path.getsize(tmp)


def to_bfloat16(path: str) -> None:
    """Rewrite the float16 ONNX file at ``path`` (inputs/outputs kept float32) as bfloat16, in place."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(path)
    f16, bf16 = TensorProto.FLOAT16, TensorProto.BFLOAT16

    def convert_tensor(t):
        if t.data_type != f16:
            return
        arr = numpy_helper.to_array(t).astype(np.float32)
        bits = arr.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)   # round to nearest even
        new = helper.make_tensor(t.name, bf16, arr.shape, rounded.tobytes(), raw=True)
        t.CopyFrom(new)

    def walk(graph):
        for t in graph.initializer:
            convert_tensor(t)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.tensor_type.elem_type == f16:
                vi.type.tensor_type.elem_type = bf16
        for node in graph.node:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == f16:
                    a.i = bf16
                elif a.type == onnx.AttributeProto.TENSOR:
                    convert_tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(proto.graph)
    tmp = path + ".bf16.onnx"
    onnx.save(proto, tmp)
    os.replace(tmp, path)
