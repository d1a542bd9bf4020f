"""Fused attention with the key/value cache: each layer's cached attention in a ``kv_cache=True`` file becomes one
ONNX Runtime ``com.microsoft.GroupQueryAttention`` that reads the past cache and writes the present one.

The decode-step file (``_kv.py``) carries the cache as ``[batch, past, kv_heads·head_dim]`` tensors; inside, each
layer reshapes and transposes the past to ``[batch, kv_heads, past, head_dim]``, concatenates the new keys/values
on the sequence axis, repeats them for the query heads (``repeat_kv``), runs ``softmax(q·kᵀ·scale + causal mask)·v``
and transposes the present back. ONNX Runtime's ``GroupQueryAttention`` does all of that in one kernel, with the
cache in its own layout ``[batch, kv_heads, sequence, head_dim]``. This pass finds each layer's attention from the
graph's cache structure (the past input → ``Concat`` on the sequence axis → present output, and the two ``MatMul``
and the ``Softmax`` that read the concatenated keys and values), not from a model's names, and rewrites it:

* query/new key/new value (after rotary embedding, which stays where it is: ``do_rotary=0``) go in as
  ``[batch, sequence, heads·head_dim]``; the scale is the product of the scalar factors on both sides of ``q·kᵀ``;
* ``seqlens_k`` (``[batch]``, int32) = ``past + sequence − 1`` and ``total_sequence_length`` = ``past + sequence``,
  both from the input shapes: a ``kv_cache=True`` file has no attention mask, so every row of a batch has the same
  length (the file's own contract, as for the unfused file);
* a ``kv_cache="padded"`` file (``attention_mask`` ``[batch, total]`` and ``position_ids`` inputs): the total is
  the mask's length, ``seqlens_k`` = total − 1 for every row, and the mask becomes the op's ``attention_bias``
  (0 / −30000 at left padding, ``[batch, 1, sequence, total]``; ONNX Runtime's CPU kernel applies it and masks the
  future itself). The past's own length is then read by nothing but the fused op, so a caller may bind each
  present output to its past input, a buffer of the maximum length the op writes in place
  (:func:`shares_buffers`, :meth:`Runtime.generate`);
* the cache inputs and outputs keep their names and order; their layout becomes ``[batch, kv_heads, sequence,
  head_dim]`` and the file's ``peftfx.kv_cache`` metadata says so (``layout``), which :meth:`Runtime.generate` and the
  export's verification read.

A graph that does not have exactly this structure (another op between the scores and the softmax — soft-capping,
ALiBi —, a mask input other than a ``kv_cache="padded"`` file's, a cache read other than through its shape and
the concatenation, a model with sliding-window attention) is refused with the reason; the file is then left exactly as it was. The rewrite is
verified like every export (ONNX Runtime against PyTorch, prefill and cached steps).
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np

__all__ = ["LAYOUTS", "MASK_INPUTS", "KvFusionRefused", "cache_shape", "fuse_kv_attention", "mask_feeds", "shares_buffers",
           "unsupported_config"]

#: the extra inputs of a ``kv_cache="padded"`` file (rows of different lengths, left-padded)
MASK_INPUTS = ("attention_mask", "position_ids")
# a file's cache layout (``peftfx.kv_cache`` metadata "layout"): as traced by _kv.py, and after this rewrite
LAYOUTS = {"bsd": "[batch, sequence, kv_heads*head_dim]", "bnsh": "[batch, kv_heads, sequence, head_dim]"}
_REPEAT = {"Unsqueeze", "Expand", "Reshape"}
_VIEW = {"Reshape", "Transpose"}


def cache_shape(kv: dict[str, Any], batch: int, sequence: int) -> tuple[int, ...]:
    """The shape of one cache tensor of a file with ``peftfx.kv_cache`` metadata ``kv`` (either layout)."""
    if kv.get("layout") == LAYOUTS["bnsh"]:
        return (batch, int(kv["kv_heads"]), sequence, int(kv["head_dim"]))
    return (batch, sequence, int(kv["kv_heads"]) * int(kv["head_dim"]))


class KvFusionRefused(Exception):
    """This graph's cached attention cannot be rewritten soundly (the reason is the message); the file is unchanged."""


def unsupported_config(config: Any) -> str | None:
    """Why a Hugging Face config's attention differs from ``GroupQueryAttention``'s causal softmax attention, or
    ``None``. Checked before the graph (the graph alone does not tell a sliding-window mask from a causal one)."""
    if config is None:
        return None
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ()
    if window and (not types or any("sliding" in str(t) for t in types)) and \
            getattr(config, "use_sliding_window", True) is not False:
        return (f"the model uses sliding-window attention (sliding_window={window}); its mask is not the causal "
                "mask GroupQueryAttention computes")
    for attr in ("attn_logit_softcapping", "alibi", "use_alibi"):
        if getattr(config, attr, None):
            return f"the model's attention has {attr}={getattr(config, attr)!r}"
    return None


def fuse_kv_attention(path: str, layout, heads: int, config: Any = None, check=None):
    """Rewrite the cached attention of the ``kv_cache=True`` file at ``path`` in place (temporary file + rename).

    ``layout`` is the export's :class:`~peftfx.export._kv.CacheLayout`; ``heads`` the number of query heads.
    ``check(tmp_path)`` (optional) must accept the rewritten file before it replaces ``path`` (it raises otherwise).
    Returns ``(new layout, {"GroupQueryAttention": layers})``; raises :class:`KvFusionRefused` (file unchanged)."""
    import onnx

    reason = unsupported_config(config)
    if reason:
        raise KvFusionRefused(reason)
    if heads <= 0 or heads % layout.kv_heads:
        raise KvFusionRefused(f"{heads} query heads are not a multiple of {layout.kv_heads} key/value heads")
    proto = onnx.load(path, load_external_data=False)
    _rewrite(proto, layout, heads)
    tmp = path + ".kvfused.onnx"
    try:
        onnx.save(proto, tmp)        # initializers stay where they were (embedded, or in the same external file)
        if check is not None:
            try:
                check(tmp)
            except Exception as e:  # noqa: BLE001 - the caller's check says why in its message
                raise KvFusionRefused(str(e)) from None
        _same_as_before(path, tmp, layout, replace(layout, order="bnsh"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return replace(layout, order="bnsh"), {"GroupQueryAttention": layout.layers}


def _same_as_before(before: str, after: str, old, new, tol: float = 1e-4) -> None:
    """The rewritten file computes what the file did (ONNX Runtime, CPU): a prefill of 3 tokens at batch 2 and one
    cached step; logits and present caches (in their layouts) within ``tol`` (relative to the largest value)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    rng = np.random.default_rng(0)
    runs = []
    for path, lay in ((before, old), (after, new)):
        try:
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT's own error types
            raise KvFusionRefused(f"ONNX Runtime cannot load the rewritten file: {str(e).splitlines()[0][:200]}") \
                from None
        kv = lay.to_dict()
        floats = next(i.type for i in sess.get_inputs() if i.name == kv["inputs"][0])
        dtype = np.float16 if "float16" in floats else np.float32
        ids = rng.integers(0, 2, (2, 3)) if not runs else runs[0][0]
        past = {n: np.zeros(cache_shape(kv, 2, 0), dtype) for n in kv["inputs"]}
        # other inputs (adapter parameters of adapter_inputs=True, before their defaults are added): fixed values
        extra = {i.name: np.random.default_rng(len(i.name)).normal(0, 0.1, i.shape).astype(np.float32)
                 for i in sess.get_inputs() if i.name != "input_ids" and i.name not in kv["inputs"]
                 and all(isinstance(d, int) for d in i.shape) and "float" in i.type}
        outs = []
        # a kv_cache="padded" file: row 0 left-padded by one token; only real positions are compared (what the
        # model computes at padding is not used by any real position)
        padded = "mask_inputs" in kv
        mask = np.array([[0, 1, 1], [1, 1, 1]], np.int64) if padded else np.ones((2, 3), np.int64)
        for x in (ids, ids[:, -1:]):
            if x.shape[1] == 1:
                mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
            masks = mask_feeds(mask, x.shape[1]) if padded else {}
            try:
                got = dict(zip([o.name for o in sess.get_outputs()],
                               sess.run(None, {"input_ids": x, **masks, **past, **extra})))
            except Exception as e:  # noqa: BLE001
                raise KvFusionRefused(f"the rewritten file does not run: {str(e).splitlines()[0][:200]}") from None
            past = {i: got[o] for i, o in zip(kv["inputs"], kv["outputs"])}
            real = mask.astype(bool)
            outs.append([got["logits"][real[:, -x.shape[1]:]]] + [_as_bsd(got[o], kv)[real] for o in kv["outputs"]])
        runs.append((ids, outs))
    for a, b in zip(runs[0][1], runs[1][1]):
        for x, y in zip(a, b):
            err = float(np.abs(x.astype(np.float64) - y).max()) / max(1.0, float(np.abs(x).max()))
            if not err <= tol:
                raise KvFusionRefused(f"the fused attention differs from the file's own by {err:.2e} (relative) "
                                      "on a test prefill and step")


def mask_feeds(mask: Any, sequence: int) -> dict[str, Any]:
    """The ``attention_mask``/``position_ids`` inputs of a ``kv_cache="padded"`` step whose ``sequence`` new tokens
    are the last columns of ``mask`` (``[batch, past + sequence]``, 0 at left padding; numpy int64). Positions count
    the real tokens before each one, as Hugging Face ``generate`` does (``cumsum(mask) − 1``; 1 at padding)."""
    mask = np.ascontiguousarray(mask, dtype=np.int64)
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[:, mask.shape[1] - sequence:]
    return {"attention_mask": mask, "position_ids": np.ascontiguousarray(positions)}


def _as_bsd(x: np.ndarray, kv: dict) -> np.ndarray:
    if kv["layout"] == LAYOUTS["bnsh"]:
        return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
    return x


# ------------------------------------------------------------------------------------------------- graph helpers
class _Graph:
    def __init__(self, graph):
        self.g = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.inits:
            t = self.inits[name]
            return None if t.data_location == 1 else numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def scalar(self, name: str) -> float | None:
        c = self.const(name)
        return float(c.reshape(())) if c is not None and c.size == 1 else None

    def only_user(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def _attr(node, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _scale_factor(gr: _Graph, node) -> tuple[float, str] | None:
    """``(factor, other input)`` for a ``Mul``/``Div`` of a tensor by a scalar constant."""
    if node.op_type == "Mul":
        for a, b in ((0, 1), (1, 0)):
            s = gr.scalar(node.input[b])
            if s is not None:
                return s, node.input[a]
    if node.op_type == "Div":
        s = gr.scalar(node.input[1])
        if s:
            return 1.0 / s, node.input[0]
    return None


def _cache_concat(gr: _Graph, past: str):
    """The ``Concat`` on the sequence axis that appends this layer's new keys/values to the past input."""
    cur, chain = past, []
    while True:
        users = [n for n in gr.consumers.get(cur, []) if not (cur == past and n.op_type == "Shape")]
        if len(users) != 1:
            raise KvFusionRefused(f"{past} is read by {len(users)} ops besides its shape (expected one path to the "
                                  "cache concatenation)")
        node = users[0]
        if node.op_type in _VIEW:
            chain.append(node)
            cur = node.output[0]
            continue
        if node.op_type == "Concat" and len(node.input) == 2 and node.input[0] == cur and \
                _attr(node, "axis") in (2, -2):
            return node, chain
        raise KvFusionRefused(f"{past} reaches a {node.op_type} where the cache concatenation was expected")


def _present_chain(gr: _Graph, concat, present: str) -> list:
    node, chain = gr.producer.get(present), []
    while node is not None and node.op_type in _VIEW:
        chain.append(node)
        if node.input[0] == concat.output[0]:
            return chain
        node = gr.producer.get(node.input[0])
    raise KvFusionRefused(f"{present} is not the concatenated cache of its layer (reshaped/transposed)")


def _forward_layout(gr: _Graph, start: str, end_ops: set[str], present_chain: list) -> tuple[Any, str, list[int]]:
    """From the concatenated cache (``[batch, kv_heads, seq, head_dim]``) through ``repeat_kv`` and head
    reshapes/transposes (Unsqueeze/Expand/Reshape/Transpose) to the first op in ``end_ops``: ``(that op, the value
    it reads, the composed permutation of the transposes on the way)``. The present output's own chain is not part
    of it. Reshapes are taken to split/merge heads (the fused file is checked numerically against this one)."""
    skip = {id(n) for n in present_chain}
    cur, perm = start, [0, 1, 2, 3]
    while True:
        users = [n for n in gr.consumers.get(cur, []) if id(n) not in skip]
        if len(users) != 1:
            raise KvFusionRefused(f"the concatenated cache {start} feeds {len(users)} attention paths (expected 1)")
        node = users[0]
        if node.op_type in end_ops:
            return node, cur, perm
        if node.op_type not in _REPEAT | {"Transpose"} or node.input[0] != cur:
            raise KvFusionRefused(f"the cache {start} reaches a {node.op_type} before the attention matmul")
        if node.op_type == "Transpose":
            p = list(_attr(node, "perm", []))
            if sorted(p) != [0, 1, 2, 3]:
                raise KvFusionRefused(f"a transpose {p} of the cache is not one of heads and sequence")
            perm = [perm[i] for i in p]
        cur = node.output[0]


def _layer(gr: _Graph, k_past: str, v_past: str, k_present: str, v_present: str) -> dict[str, Any]:
    cat_k, _ = _cache_concat(gr, k_past)
    cat_v, _ = _cache_concat(gr, v_past)
    chain_k, chain_v = _present_chain(gr, cat_k, k_present), _present_chain(gr, cat_v, v_present)
    # keys: repeat (and head reshapes/transposes: kᵀ) → [Mul scale] → MatMul(q, ·)
    node, cur, perm = _forward_layout(gr, cat_k.output[0], {"MatMul", "Mul", "Div"}, chain_k)
    if perm != [0, 1, 3, 2]:
        raise KvFusionRefused(f"the keys reach q·kᵀ transposed by {perm}, not as kᵀ")
    scale = 1.0
    while node is not None and _scale_factor(gr, node) is not None:
        scale *= _scale_factor(gr, node)[0]
        cur = node.output[0]
        node = gr.only_user(cur)
    if node is None or node.op_type != "MatMul" or node.input[1] != cur:
        raise KvFusionRefused("no q·kᵀ MatMul reads the keys")
    scores = node
    q = scores.input[0]
    while (p := gr.producer.get(q)) is not None and _scale_factor(gr, p) is not None:
        s, q = _scale_factor(gr, p)
        if len(gr.consumers.get(p.output[0], [])) != 1:
            raise KvFusionRefused("the scaled query is read elsewhere")
        scale *= s
    # scores → [Mul scale] → Add(mask) → Softmax(-1) → [IsNaN/Where] → MatMul(·, v)
    cur, node, masked = scores.output[0], gr.only_user(scores.output[0]), False
    while node is not None and node.op_type in ("Mul", "Div", "Add"):
        if node.op_type == "Add" and not masked:
            masked = True
        elif _scale_factor(gr, node) is not None:
            scale *= _scale_factor(gr, node)[0]
        else:
            raise KvFusionRefused(f"a {node.op_type} between the attention scores and the softmax")
        cur, node = node.output[0], gr.only_user(node.output[0])
    if node is None or node.op_type != "Softmax" or _attr(node, "axis", -1) not in (-1, 3):
        raise KvFusionRefused("the attention scores do not go straight into a softmax over the keys "
                              f"({'nothing' if node is None else node.op_type})")
    if not masked:
        raise KvFusionRefused("the attention has no mask (GroupQueryAttention is causal)")
    probs = node.output[0]
    users = gr.consumers.get(probs, [])
    if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:      # softmax of an all-masked row
        where = next(u for u in users if u.op_type == "Where")
        probs = where.output[0]
    node = gr.only_user(probs)
    if node is None or node.op_type != "MatMul" or node.input[0] != probs:
        raise KvFusionRefused("the attention probabilities do not go into a MatMul with the values")
    mix = node
    vnode, vcur, perm = _forward_layout(gr, cat_v.output[0], {"MatMul"}, chain_v)
    if vnode is not mix or mix.input[1] != vcur or perm != [0, 1, 2, 3]:
        raise KvFusionRefused("the values of the attention are not the layer's concatenated cache")
    # the output [batch, heads, seq, head_dim] → transposes/reshapes → [batch, seq, heads·head_dim] (a Reshape)
    cur, perm, r = mix.output[0], [0, 1, 2, 3], None
    while (t := gr.only_user(cur)) is not None and t.op_type in _VIEW and t.input[0] == cur:
        if t.op_type == "Transpose":
            p = list(_attr(t, "perm", []))
            if sorted(p) != [0, 1, 2, 3]:
                break
            perm = [perm[i] for i in p]
        r, cur = t, t.output[0]
    if r is None or r.op_type != "Reshape" or perm != [0, 2, 1, 3]:
        raise KvFusionRefused("the attention output is not transposed/reshaped back to [batch, sequence, hidden]")
    return {"q": q, "k": cat_k.input[1], "v": cat_v.input[1], "out": r.output[0], "scale": scale,
            "old_out": r, "present_k": chain_k[0], "present_v": chain_v[0]}


def _rewrite(proto, layout, heads: int) -> None:
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    gr = _Graph(graph)
    kv = layout.to_dict()
    pasts, presents = kv["inputs"], kv["outputs"]
    inputs = {i.name for i in graph.input}
    if not set(pasts) <= inputs or not set(presents) <= gr.outputs:
        raise KvFusionRefused("the file does not have the cache inputs/outputs of a kv_cache=True export")
    padded = layout.padded
    extra = [n for n in inputs if ("mask" in n or "position" in n) and not (padded and n in MASK_INPUTS)]
    if extra:
        raise KvFusionRefused(f"the file takes {extra}: rows of different lengths are handled only through a "
                              f"kv_cache='padded' export's {list(MASK_INPUTS)}")
    if padded and not set(MASK_INPUTS) <= inputs:
        raise KvFusionRefused(f"a kv_cache='padded' file must take {list(MASK_INPUTS)}; this one takes "
                              f"{sorted(inputs)}")
    layers = [_layer(gr, pasts[2 * i], pasts[2 * i + 1], presents[2 * i], presents[2 * i + 1])
              for i in range(layout.layers)]
    scales = {round(x["scale"], 9) for x in layers}
    if any(not np.isfinite(x["scale"]) or x["scale"] <= 0 for x in layers):
        raise KvFusionRefused(f"attention scales {sorted(scales)} are not positive")

    new_nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    p = "kvgqa_"
    const(p + "flat", np.array([0, 0, -1], np.int64))
    const(p + "one", np.array([1], np.int32))
    const(p + "scalar", np.array([], np.int64))
    new_nodes += [
        helper.make_node("Shape", ["input_ids"], [p + "seq"], start=1, end=2),
        helper.make_node("Shape", ["input_ids"], [p + "batch"], start=0, end=1)]
    if padded:
        # the total length is the mask's (so the past inputs may be longer buffers that the op writes in place);
        # GroupQueryAttention masks the future itself, the bias masks left padding: 0 where attention_mask is 1,
        # a large negative number where it is 0 (finite, so a row of padding only attends to padding, no NaN)
        dtype = _float_type(graph, pasts[0])
        const(p + "neg", np.array(_MASKED, _NP_FLOAT[dtype]))
        const(p + "zero", np.array(0, _NP_FLOAT[dtype]))
        const(p + "izero", np.array(0, np.int64))
        const(p + "axes12", np.array([1, 2], np.int64))
        const(p + "one64", np.array([1], np.int64))
        new_nodes += [
            helper.make_node("Shape", ["attention_mask"], [p + "total64"], start=1, end=2),
            helper.make_node("Equal", ["attention_mask", p + "izero"], [p + "padding"]),
            helper.make_node("Where", [p + "padding", p + "neg", p + "zero"], [p + "bias2"]),
            helper.make_node("Unsqueeze", [p + "bias2", p + "axes12"], [p + "bias4"]),
            helper.make_node("Concat", [p + "batch", p + "one64", p + "seq", p + "total64"], [p + "bias_shape"],
                             axis=0),
            helper.make_node("Expand", [p + "bias4", p + "bias_shape"], [p + "bias"])]
    else:
        new_nodes += [
            helper.make_node("Shape", [pasts[0]], [p + "past"], start=2, end=3),
            helper.make_node("Add", [p + "seq", p + "past"], [p + "total64"])]
    new_nodes += [
        helper.make_node("Cast", [p + "total64"], [p + "total1"], to=TensorProto.INT32),
        helper.make_node("Reshape", [p + "total1", p + "scalar"], [p + "total"]),
        helper.make_node("Sub", [p + "total1", p + "one"], [p + "seqlen1"]),
        helper.make_node("Expand", [p + "seqlen1", p + "batch"], [p + "seqlens_k"]),
    ]
    for i, x in enumerate(layers):
        q3 = []
        for part in ("q", "k", "v"):
            t, o = f"{p}{i}_{part}_bsnh", f"{p}{i}_{part}"
            new_nodes += [helper.make_node("Transpose", [x[part]], [t], perm=[0, 2, 1, 3]),
                          helper.make_node("Reshape", [t, p + "flat"], [o])]
            q3.append(o)
        for old in (x["present_k"], x["present_v"]):        # the present outputs now come from the fused op
            old.output[0] = old.output[0] + "_unfused"
        out = f"{p}{i}_out"
        new_nodes.append(helper.make_node(
            "GroupQueryAttention", q3 + [pasts[2 * i], pasts[2 * i + 1], p + "seqlens_k", p + "total"]
            + (["", "", "", p + "bias"] if padded else []),
            [out, presents[2 * i], presents[2 * i + 1]], name=f"GroupQueryAttention_{i}", domain="com.microsoft",
            num_heads=heads, kv_num_heads=layout.kv_heads, scale=float(x["scale"])))
        for n in graph.node:
            for j, name in enumerate(n.input):
                if name == x["out"]:
                    n.input[j] = out
    graph.initializer.extend(inits)
    _insert_sorted(graph, new_nodes)
    _prune(graph)
    _relayout_io(graph, pasts, presents, layout)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


_MASKED = -30000.0     # the bias at left padding: exp(−3e4) is 0 in float32; float16 holds it (−inf would give NaN)
_NP_FLOAT = {1: np.float32, 10: np.float16, 11: np.float64}


def _float_type(graph, name: str) -> int:
    vi = next((v for v in graph.input if v.name == name), None)
    t = vi.type.tensor_type.elem_type if vi is not None else 1
    if t not in _NP_FLOAT:
        raise KvFusionRefused(f"{name} has ONNX element type {t}, not a float type")
    return t


def shares_buffers(path_or_proto) -> bool:
    """Whether the fused file at ``path_or_proto`` can run with each present output bound to its past input's buffer
    (a preallocated ``[batch, kv_heads, max_sequence, head_dim]`` that GroupQueryAttention writes in place): it takes
    an ``attention_mask`` (the total length is the mask's) and nothing but the fused ops reads the past inputs."""
    import onnx

    proto = onnx.load(os.fspath(path_or_proto), load_external_data=False) \
        if isinstance(path_or_proto, (str, os.PathLike)) else path_or_proto
    g = proto.graph
    names = {i.name for i in g.input}
    pasts = {n for n in names if n.startswith("past_key_values.")}
    if "attention_mask" not in names or not pasts:
        return False
    for n in g.node:
        if any(i in pasts for i in n.input) and n.op_type != "GroupQueryAttention":
            return False
    return any(n.op_type == "GroupQueryAttention" for n in g.node)


def _insert_sorted(graph, new_nodes) -> None:
    """Add ``new_nodes`` and order the graph topologically."""
    nodes = list(graph.node) + list(new_nodes)
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    order, pending = [], nodes
    while pending:
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise KvFusionRefused(f"the rewritten graph has a cycle at {pending[0].op_type} {pending[0].name!r}")
        ids = {id(n) for n in done}
        for n in done:
            ready.update(n.output)
        order += done
        pending = [n for n in pending if id(n) not in ids]
    del graph.node[:]
    graph.node.extend(order)


def _prune(graph) -> None:
    """Drop nodes (and initializers, value infos) no graph output depends on any more."""
    needed = {o.name for o in graph.output}
    keep = []
    for n in reversed(list(graph.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vis = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vis)


def _relayout_io(graph, pasts: list[str], presents: list[str], layout) -> None:
    """Cache inputs/outputs ``[batch, seq, kv·hd]`` → ``[batch, kv, seq, hd]``; the shape reads of the past inputs
    follow (the sequence axis moves from 1 to 2)."""
    from onnx import helper

    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    for name in pasts:
        for n in users.get(name, []):
            if n.op_type == "GroupQueryAttention" or n.output[0].startswith("kvgqa_"):
                continue
            start, end = _attr(n, "start", 0), _attr(n, "end", None)
            if n.op_type != "Shape" or (start, end) not in ((0, 1), (1, 2)):
                raise KvFusionRefused(f"{name} is still read by a {n.op_type} after the rewrite")
            if (start, end) == (1, 2):
                del n.attribute[:]
                n.attribute.extend([helper.make_attribute("start", 2), helper.make_attribute("end", 3)])
    for vi in list(graph.input) + list(graph.output):
        if vi.name in pasts or vi.name in presents:
            dims = vi.type.tensor_type.shape.dim
            old = [(d.dim_param, d.dim_value) for d in dims]
            new = [old[0], ("", layout.kv_heads), old[1], ("", layout.head_dim)]
            del dims[:]
            for param, value in new:
                d = dims.add()
                if param:
                    d.dim_param = param
                else:
                    d.dim_value = value
