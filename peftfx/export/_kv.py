"""The decode-step graph of a causal LM: past keys/values in, logits and present keys/values out.

A :class:`~peftfx.PeftModel` is traced with ``use_cache=False`` (a Hugging Face ``DynamicCache`` cannot cross
``torch.export``). For generation we trace the source model once more through :class:`_CacheStep`, which takes one
tensor per layer and per key/value, builds the model's own ``DynamicCache`` from them inside the graph, and returns
the updated cache as tensors again. Each cache tensor is laid out ``[batch, past_sequence, kv_heads·head_dim]`` —
three dimensions, so :func:`peftfx.trace` keeps batch and sequence dynamic. The step graph then receives the
PeftModel's own parameters (by name) and its adapters, spliced at the sites with the same keys, so it computes
exactly what the PeftModel computes, now with a cache. A past of length 0 is the prefill. With ``padded=True``
(``export_onnx(kv_cache="padded")``) the step also takes ``attention_mask`` ``[batch, past + sequence]`` and
``position_ids`` ``[batch, sequence]`` and hands them to the model, so a batch of left-padded prompts of different
lengths decodes as Hugging Face ``generate`` decodes it. The optimisation stage
(``optimize="all"``, CPU) may then rewrite the attention to ONNX Runtime's ``GroupQueryAttention``, whose cache is
``[batch, kv_heads, sequence, head_dim]`` (``_kv_fusion.py``); :class:`CacheLayout` ``order`` and the file's
``peftfx.kv_cache`` metadata ``layout`` say which one a file has.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .._errors import ExportError
from ..model import AdapterRecord
from ._build import keep_modes
from ._kv_fusion import LAYOUTS, MASK_INPUTS, mask_feeds

__all__ = ["MASK_INPUTS", "CacheLayout", "build_step_model", "mask_feeds", "past_names", "present_names"]

PREFIX = "lm"


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    kv_heads: int
    head_dim: int
    heads: int = 0          # query heads (0: unknown)
    order: str = "bsd"      # the file's cache layout: "bsd" as traced, "bnsh" after the fused-attention rewrite
    padded: bool = False    # the file takes attention_mask [batch, past+sequence] and position_ids [batch, sequence]

    @property
    def width(self) -> int:
        return self.kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "heads": self.heads,
                "layout": LAYOUTS[self.order],
                "inputs": past_names(self.layers), "outputs": present_names(self.layers),
                **({"mask_inputs": list(MASK_INPUTS)} if self.padded else {})}


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{t}" for i in range(layers) for t in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{t}" for i in range(layers) for t in ("key", "value")]


def _kwarg_names(layers: int) -> list[str]:
    return [f"past_{t}_{i}" for i in range(layers) for t in ("key", "value")]


class _CacheStepBase(nn.Module):
    def __init__(self, lm: nn.Module, layout: CacheLayout, cache_arg: str):
        super().__init__()
        setattr(self, PREFIX, lm)
        self.layout = layout
        self.cache_arg = cache_arg

    def _step(self, input_ids: torch.Tensor, past: dict[str, torch.Tensor],
              masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        from transformers import DynamicCache

        lm, lay = getattr(self, PREFIX), self.layout
        b = input_ids.shape[0]
        data = []
        for i in range(lay.layers):
            k, v = past[f"past_key_{i}"], past[f"past_value_{i}"]
            data.append((k.view(b, k.shape[1], lay.kv_heads, lay.head_dim).transpose(1, 2),
                         v.view(b, v.shape[1], lay.kv_heads, lay.head_dim).transpose(1, 2)))
        cache = DynamicCache(data, config=getattr(lm, "config", None))
        out = lm(input_ids=input_ids, use_cache=True, **(masks or {}), **{self.cache_arg: cache})
        result = {"logits": out.logits}
        for i, layer in enumerate(_cache_of(out).layers):
            for t, x in (("key", layer.keys), ("value", layer.values)):
                result[f"present.{i}.{t}"] = x.transpose(1, 2).reshape(b, x.shape[2], lay.width)
        return result


def _cache_of(out: Any):
    keys = list(out.keys()) if hasattr(out, "keys") else []
    name = "cache" if "cache" in keys else "past_key_values"     # transformers ≥ 5.2 renamed the field
    cache = getattr(out, name, None)
    if cache is None or not hasattr(cache, "layers"):
        raise ExportError("the model returned no key/value cache with use_cache=True; kv_cache export needs a "
                          "Hugging Face causal LM (transformers ≥ 5) that returns a DynamicCache.")
    return cache


def _step_class(layout: CacheLayout) -> type:
    """A subclass whose ``forward`` has one named parameter per cache tensor (torch.export binds inputs by name)."""

    def forward(self, input_ids, **past):
        masks = {n: past.pop(n) for n in MASK_INPUTS if n in past}
        return self._step(input_ids, past, masks)

    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), P("input_ids", P.POSITIONAL_OR_KEYWORD)]
    params += [P(n, P.POSITIONAL_OR_KEYWORD) for n in (MASK_INPUTS if layout.padded else ())]
    params += [P(n, P.POSITIONAL_OR_KEYWORD) for n in _kwarg_names(layout.layers)]
    forward.__signature__ = inspect.Signature(params)
    return type("CacheStep", (_CacheStepBase,), {"forward": forward})


def _cache_arg(source: nn.Module) -> str:
    params = inspect.signature(source.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ExportError(f"{type(source).__name__}.forward takes no past_key_values; kv_cache export needs a causal "
                      "LM that accepts a key/value cache.")


def cache_layout(source: nn.Module, input_ids: torch.Tensor, cache_arg: str) -> CacheLayout:
    with keep_modes(source), torch.no_grad():
        source.eval()
        out = source(input_ids=input_ids[:1, :2], use_cache=True)
    layers = _cache_of(out).layers
    k = layers[0].keys
    if k is None or k.dim() != 4:
        raise ExportError("the model's cache layers hold no [batch, heads, sequence, head_dim] keys; kv_cache export "
                          "supports the standard DynamicCache layout.")
    cfg = getattr(source, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = next((int(v) for a in ("num_attention_heads", "n_head", "num_heads")
                  if isinstance(v := getattr(cfg, a, None), int)), 0)
    return CacheLayout(len(layers), int(k.shape[1]), int(k.shape[3]), heads)


def build_step_model(pm, source: nn.Module, input_ids: torch.Tensor, padded: bool = False):
    """(step PeftModel with pm's parameters and adapters, example kwargs, CacheLayout). ``padded``: the step also
    takes ``attention_mask`` (``[batch, past + sequence]``, 0 at left padding) and ``position_ids``
    (``[batch, sequence]``), as Hugging Face ``generate`` passes them for a left-padded batch."""
    from ..trace import trace as peftfx_trace
    from ..passes.splice import splice_pass
    from ..sites import find_sites

    if not isinstance(source, nn.Module) or not hasattr(source, "config"):
        raise ExportError("kv_cache=True needs source=<the Hugging Face model the PeftModel was traced from>.")
    cache_arg = _cache_arg(source)
    layout = replace(cache_layout(source, input_ids, cache_arg), padded=bool(padded))
    step = _step_class(layout)(source, layout, cache_arg)
    ids = input_ids if input_ids.shape[0] >= 2 else input_ids.repeat(2, 1)
    b, s, p = ids.shape[0], ids.shape[1], 3
    past = {n: torch.zeros(b, p, layout.width, dtype=_float_dtype(source), device=ids.device)
            for n in _kwarg_names(layout.layers)}
    if padded:                  # row 0 left-padded by one position (values do not shape the trace; sizes do)
        mask = torch.ones(b, p + s, dtype=torch.int64, device=ids.device)
        mask[0, 0] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:].clone()     # not a view (export guards on _base)
        past = {"attention_mask": mask, "position_ids": positions, **past}
    with keep_modes(source):
        step.train(source.training)
        spm = peftfx_trace(step, {"input_ids": ids, **past})
    _adopt_parameters(spm, pm)
    sites = {s.key: s for s in find_sites(spm)}
    items = []
    for rec in pm.peft_info.adapters.values():
        site = sites.get(f"{PREFIX}.{rec.site['key']}")
        if site is None or list(site.weight_shape) != list(rec.site["weight_shape"]):
            raise ExportError(f"adapter {rec.name}: its site {rec.site['key']} is not in the model's cache graph; "
                              "is source= the model this PeftModel was traced from?")
        name = f"{PREFIX}.{rec.name}"
        spm.peft_info.adapters[name] = AdapterRecord(name=name, method=rec.method, rule_index=rec.rule_index,
                                                     site=site.describe(), node=site.node.name)
        items.append((site.node, site.op, name, pm.get_submodule(rec.name)))
    spm.peft_info.rules = list(pm.peft_info.rules)
    splice_pass(spm, items)
    spm.train(pm.training)
    return spm, {"input_ids": ids, **past}, layout


def _float_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _adopt_parameters(spm, pm) -> None:
    """Point every parameter and buffer of the step graph at the PeftModel's tensor of the same name."""
    theirs = dict(pm.named_parameters(remove_duplicate=False))
    theirs.update(dict(pm.named_buffers(remove_duplicate=False)))
    mine = list(spm.named_parameters(remove_duplicate=False)) + list(spm.named_buffers(remove_duplicate=False))
    for name, t in mine:
        new = theirs.get(name[len(PREFIX) + 1:] if name.startswith(PREFIX + ".") else name)
        if new is None or new is t:
            continue
        if new.shape != t.shape:
            raise ExportError(f"{name}: the model's tensor has shape {tuple(t.shape)} but the PeftModel's has "
                              f"{tuple(new.shape)}; pass the source model the PeftModel was traced from.")
        owner_name, _, attr = name.rpartition(".")
        owner = spm.get_submodule(owner_name) if owner_name else spm
        if attr in owner._parameters:
            owner._parameters[attr] = new if isinstance(new, nn.Parameter) else nn.Parameter(new, requires_grad=False)
        else:
            owner._buffers[attr] = new.detach() if isinstance(new, nn.Parameter) else new

