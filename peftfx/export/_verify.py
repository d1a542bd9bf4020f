"""Verification of an exported file: ONNX Runtime against the PyTorch model, on several input shapes.

The reference is always the model the user handed in (unmerged adapters, no cache, float32 as it is), so a wrong
merge, fold, cache graph or float16 conversion all show up as a difference here.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .._errors import ExportError
from ._build import BATCH, SEQUENCE, flatten_outputs, keep_modes, resize_inputs, strip_adapters
from ._kv_fusion import cache_shape

__all__ = ["verify_export", "compare", "verification_cases"]

log = logging.getLogger(__name__)


def compare(case: str, name: str, got: np.ndarray, ref: torch.Tensor, tol: float) -> dict[str, Any]:
    """max |got − ref|, that over max |ref|, and whether it is within tol · max(1, max |ref|)."""
    r = ref.detach().float().cpu().numpy()
    g = np.asarray(got).astype(np.float32)
    if g.shape != r.shape:
        raise ExportError(f"{case}: ONNX output {name} has shape {list(g.shape)}, PyTorch {list(r.shape)}.")
    err = float(np.abs(g - r).max()) if r.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    if not np.isfinite(err):
        err = float("inf")
    return {"case": case, "output": name, "max_abs": err, "max_rel": err / max(scale, 1e-12),
            "ok": err <= tol * max(1.0, scale)}


def verification_cases(inputs: dict, axes: dict, limits: dict) -> list[tuple[str, dict[str, int]]]:
    """(label, {axis name: size}) cases: batch 1 at the example sizes; batch > 1 with every other dynamic axis short
    (1, 2, 3 … in axis order) and long (2× the example, plus its position), each axis within the model's limits;
    with two or more such axes also the first long and the second short, so an encoder-decoder sees a source
    shorter and a source longer than the target. In the short case separate axes take separate sizes (where the
    limits allow), so a file that wrongly tied two of them fails here."""
    example: dict[str, int] = {}
    for name, ax in axes.items():
        for i, axis in ax.items():
            example.setdefault(axis, int(inputs[name].shape[i]))
    other = [a for a in example if a != BATCH]
    if BATCH not in example and not other:
        return [(_label({}), {})]

    def clamp(axis: str, size: int) -> int:
        lo, hi = limits.get(axis, (1, None))
        return max(lo, size if hi is None else min(hi, size))

    b = example.get(BATCH, 1)
    batch = {BATCH: b + 1} if BATCH in example else {}
    short = {a: clamp(a, 1 + k) for k, a in enumerate(other)}
    long = {a: clamp(a, 2 * example[a] + k) for k, a in enumerate(other)}
    sizes = [{BATCH: 1} if BATCH in example else dict(example)]
    if other:
        sizes += [batch | short, batch | long]
        if len(other) > 1:
            sizes.append(batch | {a: (long if k % 2 == 0 else short)[a] for k, a in enumerate(other)})
    else:
        sizes.append(batch)
    for s in sizes:
        for a, n in example.items():
            s.setdefault(a, n)
    return [(_label(s), s) for s in sizes]


def _label(sizes: dict[str, int]) -> str:
    short = {BATCH: "batch", SEQUENCE: "seq"}
    return " × ".join(f"{short.get(a, a)} {n}" for a, n in sizes.items()) or "example shapes"


def _numpy(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in inputs.items()}


def verify_export(path: str, pm, plan: dict, tol: float, device: str | None) -> tuple[list[dict], list[str]]:
    from .runtime import Runtime

    rt = Runtime(path, device=device, spin=False)
    with keep_modes(pm), torch.no_grad():
        pm.eval()
        if plan["kv"] is not None:
            checks = _verify_kv(rt, pm, plan, tol)
        else:
            checks = _verify_plain(rt, pm, plan, tol)
    bad = [c for c in checks if not c["ok"]]
    for c in checks:
        log.info("verify %-28s %-12s max abs %.2e  max rel %.2e", c["case"], c["output"], c["max_abs"], c["max_rel"])
    if bad:
        worst = max(bad, key=lambda c: c["max_abs"])
        raise ExportError(f"ONNX Runtime output differs from PyTorch: {worst['output']} on {worst['case']} has max abs "
                          f"error {worst['max_abs']:.3g} (max rel {worst['max_rel']:.3g}), above tolerance {tol:g}; "
                          f"{len(bad)} of {len(checks)} checks failed.{_hint(worst)} Nothing was written.")
    return checks, rt.providers


def _hint(worst: dict) -> str:
    if worst["case"].endswith("no adapter"):
        return (" With every adapter input at zero the model is not the base model: adapter_inputs=True serves "
                "methods whose zero parameters are the identity (LoRA, Houlsby adapters); merge the others.")
    return ""


def _verify_plain(rt, pm, plan: dict, tol: float) -> list[dict]:
    inputs, axes = plan["inputs"], {n: plan["axes"][n] for n in plan["names"]}
    entries = plan["entries"]
    feeds_adapter = {e.name: plan["model"].get_parameter(e.path).detach().cpu().numpy() for e in entries}
    base = strip_adapters(pm) if entries else None
    names = list(zip(plan["out_names"], plan.get("out_keys", plan["out_names"])))   # ONNX name, PyTorch key
    checks = []
    for case, sizes in verification_cases(inputs, axes, plan.get("limits", {})):
        x = resize_inputs(inputs, axes, sizes)
        ref = dict(flatten_outputs(pm(**x)))
        got = rt.run({**_numpy(x), **feeds_adapter})
        checks += [compare(case, n, got[n], ref[k], tol) for n, k in names if k in ref]
        if base is not None:            # no adapter fed: the zero defaults must give the base model
            ref0 = dict(flatten_outputs(base(**x)))
            got0 = rt.run(_numpy(x))
            checks += [compare(case + ", no adapter", n, got0[n], ref0[k], tol) for n, k in names if k in ref0]
    return checks


def _verify_kv(rt, pm, plan: dict, tol: float) -> list[dict]:
    """Prefill (empty past) against the PyTorch logits of the prompt, then one decode step with the returned cache
    against the PyTorch logits of prompt + next token; at the example batch and at batch 1 with a longer prompt. A
    ``kv_cache="padded"`` file also runs a left-padded batch (row 0 two tokens shorter), each row's real positions
    against PyTorch on that row alone."""
    from ._kv import mask_feeds

    ids = plan["inputs"]["input_ids"]
    layout = plan["kv"]
    kv = layout.to_dict()
    pasts, presents = kv["inputs"], kv["outputs"]
    entries = plan["entries"]
    feeds_adapter = {e.name: plan["model"].get_parameter(e.path).detach().cpu().numpy() for e in entries}
    s = ids.shape[1]
    hi = plan.get("limits", {}).get(SEQUENCE, (1, None))[1]
    long = 2 * s if hi is None else min(2 * s, hi)
    prompts = [(ids, 0), (resize_inputs({"input_ids": ids[:1]}, {"input_ids": {0: BATCH, 1: SEQUENCE}},
                                        {BATCH: 1, SEQUENCE: long})["input_ids"], 0)]
    if layout.padded and s > 2:
        prompts.append((ids, 2))
    checks = []
    for prompt, pad in prompts:
        case = f"batch {prompt.shape[0]} × seq {prompt.shape[1]}" + (f", row 0 left-padded by {pad}" if pad else "")
        dtype = np.float16 if rt.input_dtype(pasts[0]) == np.float16 else np.float32
        mask = np.ones(tuple(prompt.shape), np.int64)
        mask[0, :pad] = 0
        masks = mask_feeds(mask, prompt.shape[1]) if layout.padded else {}
        past = {n: np.zeros(cache_shape(kv, prompt.shape[0], 0), dtype) for n in pasts}
        out = rt.run({"input_ids": prompt.cpu().numpy(), **masks, **past, **feeds_adapter})
        nxt = torch.from_numpy(out["logits"][:, -1].argmax(-1)).to(prompt.device)[:, None]
        past = {i: out[o] for i, o in zip(pasts, presents)}
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
        masks = mask_feeds(mask, 1) if layout.padded else {}
        step = rt.run({"input_ids": nxt.cpu().numpy(), **masks, **past, **feeds_adapter})
        full = torch.cat([prompt, nxt], 1)
        if pad:                 # each row alone, without its padding, is the reference
            for r in range(prompt.shape[0]):
                ref = _logits(pm(input_ids=full[r:r + 1, (pad if r == 0 else 0):]))
                checks.append(compare(f"{case}: row {r} prefill", "logits",
                                      out["logits"][r:r + 1, (pad if r == 0 else 0):], ref[:, :-1], tol))
                checks.append(compare(f"{case}: row {r} +1 cached step", "logits", step["logits"][r:r + 1],
                                      ref[:, -1:], tol))
            continue
        checks.append(compare(case + " prefill", "logits", out["logits"], _logits(pm(input_ids=prompt)), tol))
        ref2 = _logits(pm(input_ids=full))[:, -1:]
        checks.append(compare(case + " +1 cached step", "logits", step["logits"], ref2, tol))
    return checks


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else dict(flatten_outputs(out))["logits"]
