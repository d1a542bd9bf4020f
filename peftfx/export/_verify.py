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
from ._build import SEQUENCE, flatten_outputs, keep_modes, resize_inputs, strip_adapters

__all__ = ["verify_export", "compare"]

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


def _shapes(inputs: dict, axes: dict, limits: dict) -> list[tuple[int, int]]:
    """(batch, sequence) cases: batch 1 at the example length, batch > 1 short (1 token) and long (2×, capped)."""
    first = next(iter(inputs.values()))
    b = int(first.shape[0])
    has_seq = any(ax.get(1) == SEQUENCE for ax in axes.values())
    s = int(next((inputs[n].shape[1] for n, ax in axes.items() if ax.get(1) == SEQUENCE), 1))
    if not has_seq:
        return [(1, s), (b + 1, s)]
    long = min(2 * s, limits.get(SEQUENCE, 2 * s))
    return [(1, s), (b + 1, 1), (b + 1, long)]


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
    checks = []
    for b, s in _shapes(inputs, axes, plan.get("limits", {})):
        x = resize_inputs(inputs, axes, b, s)
        case = f"batch {b} × seq {s}"
        ref = dict(flatten_outputs(pm(**x)))
        got = rt.run({**_numpy(x), **feeds_adapter})
        checks += [compare(case, n, got[n], ref[n], tol) for n in plan["out_names"] if n in ref]
        if base is not None:            # no adapter fed: the zero defaults must give the base model
            ref0 = dict(flatten_outputs(base(**x)))
            got0 = rt.run(_numpy(x))
            checks += [compare(case + ", no adapter", n, got0[n], ref0[n], tol) for n in plan["out_names"] if n in ref0]
    return checks


def _verify_kv(rt, pm, plan: dict, tol: float) -> list[dict]:
    """Prefill (empty past) against the PyTorch logits of the prompt, then one decode step with the returned cache
    against the PyTorch logits of prompt + next token; at the example batch and at batch 1 with a longer prompt."""
    ids = plan["inputs"]["input_ids"]
    layout = plan["kv"]
    entries = plan["entries"]
    feeds_adapter = {e.name: plan["model"].get_parameter(e.path).detach().cpu().numpy() for e in entries}
    b, s = ids.shape
    long = min(2 * s, plan.get("limits", {}).get(SEQUENCE, 2 * s))
    checks = []
    for prompt in (ids, resize_inputs({"input_ids": ids[:1]}, {"input_ids": {0: "batch", 1: SEQUENCE}}, 1,
                                      long)["input_ids"]):
        case = f"batch {prompt.shape[0]} × seq {prompt.shape[1]}"
        dtype = np.float16 if rt.input_dtype(plan["names"][1]) == np.float16 else np.float32
        past = {n: np.zeros((prompt.shape[0], 0, layout.width), dtype) for n in plan["names"][1:]}
        out = rt.run({"input_ids": prompt.cpu().numpy(), **past, **feeds_adapter})
        ref = _logits(pm(input_ids=prompt))
        checks.append(compare(case + " prefill", "logits", out["logits"], ref, tol))
        nxt = torch.from_numpy(out["logits"][:, -1].argmax(-1)).to(prompt.device)[:, None]
        past = {i: out[o] for i, o in zip(plan["names"][1:], layout.to_dict()["outputs"])}
        step = rt.run({"input_ids": nxt.cpu().numpy(), **past, **feeds_adapter})
        ref2 = _logits(pm(input_ids=torch.cat([prompt, nxt], 1)))[:, -1:]
        checks.append(compare(case + " +1 cached step", "logits", step["logits"], ref2, tol))
    return checks


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else dict(flatten_outputs(out))["logits"]
