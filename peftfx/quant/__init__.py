"""Quantized base weights (QLoRA — Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv:2305.14314), dequantized on the fly in the graph; adapters train on top in full precision.

    peft = peftfx.apply(model, LoRA(rank=16, targets=select.all() & ~select.role("head")), ex)
    peftfx.quantize(peft, bits=4)              # in place: linear base weights → NF4, LoRA untouched
    merged = peftfx.merge(peft)                # dequantize → merge → re-quantize (requantize=False: float)

**NF4** (``bits=4``): the flattened weight is cut into blocks of 64; each block stores its absmax c and
4-bit indices into the NormalFloat4 code q₀…q₁₅ (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0);
ŵ = q[i]·ĉ. Double quantization: the fp32 absmaxes, minus their mean μ, are quantized again to int8 with an
fp32 scale per 256 blocks: ĉ = μ + s₂·k, k ∈ [-127, 127]. Storage: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per
weight (paper: 4.127). Values are normalised by ĉ (not c), so the rounding accounts for the scale error;
per element |w − ŵ| ≤ ĉ·δ/2 + |c − ĉ| with δ the widest code gap (0.277). The second-level quantization is
symmetric linear int8 here (the paper uses 8-bit floats, bitsandbytes a dynamic 8-bit map): its error on
ĉ is ≤ s₂/2. Two nibbles per byte, the first value in the high nibble (bitsandbytes' order).
**int8** (``bits=8``): per output row absmax, w ≈ s_o·k, k ∈ [-127, 127] (LLM.int8()'s vector-wise weights,
without the outlier decomposition). Round-trip errors are measured by ``tests/test_quant.py`` and
``bench/bench_qlora.py`` (README: "Quantized base (QLoRA)").

The graph: each quantized weight's ``get_attr`` becomes a ``call_module`` of a dequantizer that holds the
packed buffers and returns the float weight (``node.meta["peftfx"]["dequant_of"]`` names the weight it
replaced, so the site planner still finds the matmul). In training, a dequantized weight that autograd
would save for backward is saved as "its dequantizer" and rebuilt in backward (as bitsandbytes' MatMul4Bit
does), so only the packed weights stay in memory. This is the pure-torch path; bitsandbytes is not used.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from .._errors import CheckpointError, NoMatchError, PeftfxError
from ..model import PeftModel, require_peft
from .int8 import Int8Weight
from .nf4 import NF4_CODE, NF4Weight
from .recompute import install_recompute

__all__ = ["quantize", "merge_quantized", "quantized_weights", "check_unmerge", "NF4Weight", "Int8Weight",
           "NF4_CODE", "quantize_tensor", "roundtrip_error", "install_recompute"]

log = logging.getLogger(__name__)


def quantize_tensor(w: torch.Tensor, bits: int = 4, *, kind: str = "linear") -> nn.Module:
    """The dequantizer module for ``w`` (``kind``: the site kind, int8 scales per canonical output row)."""
    if bits == 4:
        return NF4Weight.from_float(w)
    if bits == 8:
        return Int8Weight.from_float(w, transposed=kind != "linear")
    raise PeftfxError(f"bits must be 4 (NF4) or 8 (int8), got {bits!r}.")


def roundtrip_error(w: torch.Tensor, bits: int = 4) -> dict[str, float]:
    """quantize → dequantize error of ``w``: relative Frobenius ‖w−ŵ‖/‖w‖, max |w−ŵ| / max|w|, mean
    |w−ŵ| / mean|w|."""
    with torch.no_grad():
        w = w.detach().float()
        d = (quantize_tensor(w, bits)() - w).abs()
        return {"rel_fro": float(d.norm() / w.norm()), "max_rel": float(d.max() / w.abs().max()),
                "mean_rel": float(d.mean() / w.abs().mean())}


def quantized_weights(pm: PeftModel) -> dict[str, nn.Module]:
    """Weight name (as the graph read it) → its dequantizer."""
    from ..passes.quantize import dequant_nodes

    return {n.meta["peftfx"]["dequant_of"]: pm.get_submodule(n.target) for n in dequant_nodes(pm)}


def quantize(pm: PeftModel, bits: int = 4, targets: Any = None, *, source: Any = None,
             recompute: bool = True) -> PeftModel:
    """Quantize the base weights of the sites ``targets`` selects (default: every weight matmul except the
    embedding and the LM head, as QLoRA/bitsandbytes do) to NF4 (``bits=4``) or int8 (``bits=8``), in place.
    Adapters (applied before or added after, :func:`peftfx.add_adapter`) stay in full precision and train.

    ``source``: for a model traced on the meta device, where to read base tensors — a mapping (state dict),
    a ``safetensors.safe_open`` handle or a callable ``name → tensor``. Targeted weights are read, quantized
    and dropped one at a time; every other meta tensor is loaded as is. Peak memory is then the quantized
    model plus its largest weight. ``recompute``: rebuild dequantized weights in backward, not save them."""
    from ..passes.quantize import quantize_weights_pass
    from ..rules import Selector, select, selector_from_dict
    from ..roles import assign_roles
    from ..sites import find_sites

    require_peft(pm, "quantize")
    if bits not in (4, 8):
        raise PeftfxError(f"bits must be 4 (NF4) or 8 (int8), got {bits!r}.")
    sel = targets if isinstance(targets, Selector) else ~select.role("head") if targets is None \
        else selector_from_dict(targets)
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    done = set(quantized_weights(pm))
    chosen = {s.weight: s.kind for s in sites if sel.matches(s) and s.weight not in done and s.kind != "conv"
              and (targets is not None or s.kind != "embedding")}      # convolutions: not quantized
    if not chosen:
        raise NoMatchError(f"quantize: targets {sel.to_dict()} select no unquantized weight matmul of this model "
                           f"({len(sites)} sites, {len(done)} already quantized); see peftfx.inspect(model).")
    merged = [r.name for r in pm.peft_info.adapters.values() if r.merged and r.site["weight"] in chosen]
    if merged:
        raise PeftfxError(f"quantize: adapters {merged[:3]} are merged into weights to be quantized; quantize "
                          "the unmerged model.")
    first: dict[int, str] = {}
    for name in list(chosen):                                  # tied aliases: quantize the tensor once
        if first.setdefault(id(pm.get_parameter(name)), name) != name:
            del chosen[name]
    read, get = _reader(pm, source, set(chosen))

    def make(name: str) -> nn.Module:
        return quantize_tensor(read(name), bits, kind=chosen[name])

    quantize_weights_pass(pm, list(chosen), make, bits)
    if source is not None:
        _load_meta(pm, get)
    if recompute:
        install_recompute(pm)
    log.info("quantized %d weight(s) to %s", len(chosen), "NF4" if bits == 4 else "int8")
    return pm


def _reader(pm: PeftModel, source: Any, chosen: set[str]) -> tuple[Callable, Callable]:
    """(weight name → float tensor to quantize, name → source tensor); checks up front that ``source``
    has every meta tensor the model needs."""
    if source is None:
        meta = sorted(n for n in chosen if pm.get_parameter(n).device.type == "meta")
        if meta:
            raise CheckpointError(f"quantize: {meta[0]} (and {len(meta) - 1} more) live on the meta device; pass "
                                  "source= (a state dict or safetensors file handle) to read their values.")
        return pm.get_parameter, None
    get = source if callable(source) and not hasattr(source, "get_tensor") else \
        source.get_tensor if hasattr(source, "get_tensor") else source.__getitem__
    keys = set(source.keys()) if hasattr(source, "keys") else None
    need = chosen | {n for n, t in list(pm.named_parameters()) + list(pm.named_buffers()) if t.device.type == "meta"}
    missing = sorted(need - keys) if keys is not None else []
    if missing:
        raise CheckpointError(f"quantize: source lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}.")
    return (lambda name: get(name) if pm.get_parameter(name).device.type == "meta" else pm.get_parameter(name)), get


def _load_meta(pm: PeftModel, read: Callable[[str], torch.Tensor]) -> None:
    """Every tensor still on the meta device gets its value from ``read``; device constants follow."""
    device = None
    with torch.no_grad():
        for name, t in list(pm.named_parameters()) + list(pm.named_buffers()):
            if t.device.type != "meta":
                continue
            value = read(name).to(t.dtype)
            device = value.device
            parent, _, attr = name.rpartition(".")
            holder = pm.get_submodule(parent) if parent else pm
            if isinstance(t, nn.Parameter):
                setattr(holder, attr, nn.Parameter(value, requires_grad=t.requires_grad))
            else:
                holder.register_buffer(attr, value, persistent=attr not in holder._non_persistent_buffers_set)
    if device is not None and pm.peft_info.device.type == "meta":
        pm._rewrite_devices(device)


def merge_quantized(pm: PeftModel, *, requantize: bool = True, inplace: bool = False) -> PeftModel:
    """Merge on a quantized base: the weights of mergeable adapters are dequantized, merged (the usual merge
    pass), and re-quantized (``requantize=True``, the model stays small; merged ≠ unmerged by one more
    quantization error) or kept in float (``requantize=False``; exact, and ``peftfx.unmerge`` works)."""
    from ..passes.merge import merge_pass
    from ..passes.quantize import dequantize_weights_pass, quantize_weights_pass

    quant = quantized_weights(pm)
    recs = [r for r in pm.peft_info.adapters.values() if not r.merged and r.site["weight"] in quant
            and getattr(pm.get_submodule(r.name), "mergeable", False)]
    names = {r.site["weight"] for r in recs}
    out = pm if inplace else pm.fork()
    if names:
        kinds = {n: type(quant[n]) for n in names}
        dequantize_weights_pass(out, names)
    out = merge_pass(out, inplace=True).graph_module
    if names and requantize:
        for bits, cls in ((4, NF4Weight), (8, Int8Weight)):
            group = sorted(n for n in names if kinds[n] is cls)
            if group:
                transposed = {n: getattr(quant[n], "transposed", False) for n in group}
                quantize_weights_pass(out, group, lambda n: _requant(out.get_parameter(n), bits, transposed[n]), bits)
        for r in recs:
            r_out = out.peft_info.adapters[r.name]
            r_out.site = {**r_out.site, "requantized": True}
    if quantized_weights(out):
        install_recompute(out)
    return out


def check_unmerge(pm: PeftModel) -> None:
    """Unmerge cannot undo a merge whose weights were re-quantized (the rounding is lost)."""
    bad = [r.name for r in pm.peft_info.adapters.values() if r.merged and r.site.get("requantized")]
    if bad:
        raise PeftfxError(f"adapters {bad[:3]} were merged into re-quantized weights; that cannot be undone "
                          "exactly. Keep the unmerged model (merge returns a copy), or merge with "
                          "peftfx.merge(model, requantize=False).")


def _requant(w: torch.Tensor, bits: int, transposed: bool) -> nn.Module:
    return NF4Weight.from_float(w) if bits == 4 else Int8Weight.from_float(w, transposed=transposed)
