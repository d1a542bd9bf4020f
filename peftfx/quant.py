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
import torch.nn.functional as F
from torch import nn

from ._errors import CheckpointError, NoMatchError, PeftfxError
from .graph import PeftModel

__all__ = ["quantize", "merge", "quantized_weights", "NF4Weight", "Int8Weight", "NF4_CODE", "quantize_tensor",
           "roundtrip_error"]

log = logging.getLogger(__name__)

#: NormalFloat4 (QLoRA appendix E; bitsandbytes' table) — derived in tests from Φ⁻¹ quantiles.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
_CHUNK = 1 << 22


class NF4Weight(nn.Module):
    """Dequantizer of one NF4 weight: ``forward() → ŵ`` (shape and dtype of the weight it replaced; the
    dtype follows ``.to()`` through the float buffer ``absmax_scale``)."""

    def __init__(self, shape: tuple[int, ...], blocksize: int = 64, scale_blocksize: int = 256):
        super().__init__()
        self.shape, self.blocksize, self.scale_blocksize = tuple(shape), blocksize, scale_blocksize
        n = _ceil(_numel(shape), blocksize)
        nb = n // blocksize
        self.register_buffer("packed", torch.zeros(n // 2, dtype=torch.uint8))
        self.register_buffer("absmax_q", torch.zeros(nb, dtype=torch.int8))
        self.register_buffer("absmax_scale", torch.zeros(_ceil(nb, scale_blocksize) // scale_blocksize))
        self.register_buffer("absmax_mean", torch.zeros(()))
        self.register_buffer("code", torch.tensor(NF4_CODE), persistent=False)

    @property
    def weight_meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.absmax_scale.dtype, device="meta")

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor, blocksize: int = 64, scale_blocksize: int = 256) -> "NF4Weight":
        m = cls(tuple(w.shape), blocksize, scale_blocksize).to(w.device)
        flat = F.pad(w.detach().reshape(-1).float(), (0, m.packed.numel() * 2 - w.numel()))
        c = flat.view(-1, blocksize).abs().amax(1)
        mean = c.mean()
        cs = F.pad(c - mean, (0, m.absmax_scale.numel() * scale_blocksize - c.numel())).view(-1, scale_blocksize)
        s2 = cs.abs().amax(1) / 127
        s2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
        k = torch.round(cs / s2[:, None]).clamp_(-127, 127).reshape(-1)[: c.numel()]
        m.absmax_q.copy_(k.to(torch.int8))
        m.absmax_scale = s2.to(w.dtype if w.dtype.is_floating_point else torch.float32)
        m.absmax_mean.copy_(mean)
        chat = m._absmax()
        mids = (m.code[1:] + m.code[:-1]) / 2
        for s in range(0, flat.numel(), _CHUNK):                      # chunked: bounded temporaries
            blk = flat[s: s + _CHUNK].view(-1, blocksize)
            c_ = chat[s // blocksize: s // blocksize + blk.shape[0], None]
            v = blk / torch.where(c_ > 0, c_, torch.ones_like(c_))
            q = torch.bucketize(v.clamp_(-1, 1), mids).to(torch.uint8).view(-1, 2)
            m.packed[s // 2: s // 2 + q.shape[0]] = (q[:, 0] << 4) | q[:, 1]
        return m

    def _absmax(self) -> torch.Tensor:
        s2 = self.absmax_scale.float().repeat_interleave(self.scale_blocksize)[: self.absmax_q.numel()]
        return (self.absmax_q.float() * s2 + self.absmax_mean.float()).clamp_(min=0)

    def indices(self) -> torch.Tensor:
        """The 4-bit code indices, one per (padded) element."""
        return torch.stack([self.packed >> 4, self.packed & 0x0F], -1).reshape(-1)

    def forward(self) -> torch.Tensor:
        lut = torch.stack([self.code.repeat_interleave(16), self.code.repeat(16)], -1)   # byte → (hi, lo)
        c = self._absmax()
        full = torch.empty(self.packed.numel() * 2, device=self.packed.device)
        step = _CHUNK // 2                     # bytes per chunk (a multiple of the block): bounded temporaries
        for s in range(0, self.packed.numel(), step):
            v = F.embedding(self.packed[s: s + step].to(torch.int32), lut).view(-1, self.blocksize)
            b0 = 2 * s // self.blocksize
            full[2 * s: 2 * s + v.numel()] = v.mul_(c[b0: b0 + v.shape[0], None]).view(-1)
        out = full[: _numel(self.shape)].view(self.shape).to(self.absmax_scale.dtype)
        _note(out, self)
        return out


class Int8Weight(nn.Module):
    """Dequantizer of one int8 weight: per row of the canonical ``[out, in]`` matrix, ŵ = s_o · k."""

    def __init__(self, shape: tuple[int, ...], transposed: bool):
        super().__init__()
        self.shape, self.transposed = tuple(shape), transposed
        rows, cols = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        self.register_buffer("qweight", torch.zeros(rows, cols, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(rows))

    @property
    def weight_meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.scale.dtype, device="meta")

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor, transposed: bool = False) -> "Int8Weight":
        m = cls(tuple(w.shape), transposed).to(w.device)
        canon = (w.t() if transposed else w).detach().float()
        s = canon.abs().amax(1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        m.qweight.copy_(torch.round(canon / s[:, None]).clamp_(-127, 127).to(torch.int8))
        m.scale = s.to(w.dtype if w.dtype.is_floating_point else torch.float32)
        return m

    def forward(self) -> torch.Tensor:
        w = self.qweight.float().mul_(self.scale.float()[:, None]).to(self.scale.dtype)
        out = w.t() if self.transposed else w
        _note(out, self)
        return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _ceil(n: int, k: int) -> int:
    return -(-n // k) * k


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


# ------------------------------------------------------------------------ backward recompute (hooks)
class _Recompute:
    """saved_tensors_hooks for one forward: a saved tensor that is (a view of) a live dequantizer output is
    stored as (dequantizer, view geometry) and rebuilt in backward. A weak reference proves identity: while
    the dequantized tensor lives, no other tensor can own its storage address."""

    def __init__(self):
        self.live: dict[int, tuple[Any, nn.Module]] = {}

    def pack(self, t: torch.Tensor) -> Any:
        try:
            entry = self.live.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return t
        if entry is None or entry[0]() is None:
            return t
        return (_Recompute, entry[1], tuple(t.shape), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(p: Any) -> torch.Tensor:
        if isinstance(p, tuple) and p and p[0] is _Recompute:
            _, module, size, stride, offset = p
            with torch.no_grad(), _paused():
                return module().as_strided(size, stride, offset)
        return p


_ACTIVE: list[_Recompute] = []


class _paused:
    def __enter__(self):
        self.saved = list(_ACTIVE)
        _ACTIVE.clear()

    def __exit__(self, *exc):
        _ACTIVE.extend(self.saved)


def _note(out: torch.Tensor, module: nn.Module) -> None:
    if _ACTIVE and out.requires_grad is False and torch.is_grad_enabled():
        import weakref

        _ACTIVE[-1].live[out.untyped_storage().data_ptr()] = (weakref.ref(out), module)


def _enter(module, args, kwargs):
    if torch.is_grad_enabled() and module.training:
        ctx = _Recompute()
        hooks = torch.autograd.graph.saved_tensors_hooks(ctx.pack, ctx.unpack)
        hooks.__enter__()
        _ACTIVE.append(ctx)
        module._peftfx_recompute.append(hooks)
    else:
        module._peftfx_recompute.append(None)


def _exit(module, args, kwargs, output):
    hooks = module._peftfx_recompute.pop() if module._peftfx_recompute else None
    if hooks is not None:
        _ACTIVE.pop()
        hooks.__exit__(None, None, None)


def install_recompute(pm: PeftModel) -> None:
    """Recompute dequantized weights in backward instead of saving them (idempotent)."""
    if getattr(pm, "_peftfx_recompute", None) is not None:
        return
    pm._peftfx_recompute = []
    pm.register_forward_pre_hook(_enter, with_kwargs=True)
    pm.register_forward_hook(_exit, with_kwargs=True, always_call=True)


# ------------------------------------------------------------------------------------------- API
def quantized_weights(pm: PeftModel) -> dict[str, nn.Module]:
    """Weight name (as the graph read it) → its dequantizer."""
    from .passes.quantize import dequant_nodes

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
    from .passes.quantize import quantize_weights_pass
    from .rules import Selector, select, selector_from_dict
    from .roles import assign_roles
    from .sites import find_sites

    if not isinstance(pm, PeftModel):
        raise PeftfxError(f"quantize() takes a model returned by peftfx.apply()/trace(), got {type(pm).__name__}.")
    if bits not in (4, 8):
        raise PeftfxError(f"bits must be 4 (NF4) or 8 (int8), got {bits!r}.")
    sel = targets if isinstance(targets, Selector) else ~select.role("head") if targets is None \
        else selector_from_dict(targets)
    sites = find_sites(pm)
    assign_roles(pm.graph, sites)
    done = set(quantized_weights(pm))
    chosen = {s.weight: s.kind for s in sites if sel.matches(s) and s.weight not in done
              and (targets is not None or s.kind != "embedding")}
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


def merge(pm: PeftModel, *, requantize: bool = True, inplace: bool = False) -> PeftModel:
    """Merge on a quantized base: the weights of mergeable adapters are dequantized, merged (the usual merge
    pass), and re-quantized (``requantize=True``, the model stays small; merged ≠ unmerged by one more
    quantization error) or kept in float (``requantize=False``; exact, and ``peftfx.unmerge`` works)."""
    from .passes.merge import merge_pass
    from .passes.quantize import dequantize_weights_pass, quantize_weights_pass

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
                          "peftfx.quant.merge(model, requantize=False).")


def _requant(w: torch.Tensor, bits: int, transposed: bool) -> nn.Module:
    return NF4Weight.from_float(w) if bits == 4 else Int8Weight.from_float(w, transposed=transposed)
