"""The rest of the drop-in face: the user's model class back with merged weights, and ``save_pretrained``.

    merged = peftfx.merge_and_unload(peft)     # the original class (e.g. LlamaForCausalLM), adapters merged
    merged.save_pretrained("merged")           # plain transformers loads it: AutoModelForCausalLM.from_pretrained
    peft.save_pretrained("out")                # the adapter only: a Hugging Face PEFT folder (format="peftfx" too)
"""
from __future__ import annotations

import copy
import functools
import logging
import os
from typing import Any

import torch
from torch import nn

from ._errors import PeftfxError
from .apply import merge
from .integrations.backbone import backbone
from .io.pretrained import save_pretrained as _save_pretrained
from .model import PeftModel, register_service, require_peft
from .variants import in_cache, not_replayable

__all__ = ["generate", "merge_and_unload", "save_pretrained"]

log = logging.getLogger(__name__)


def merge_and_unload(pm: PeftModel) -> nn.Module:
    """A copy of the module ``pm`` was traced from (its own class, config and generation utilities) whose weights
    hold every adapter merged by the adapter's own ``merge`` (the same one :func:`peftfx.merge` runs). ``pm`` and
    the original module are unchanged. Adapters that cannot merge (Houlsby, virtual tokens) are an error: they
    are not weights of the original architecture. When ``pm`` has activation checkpointing on, the returned module
    has its own (Hugging Face's ``gradient_checkpointing_enable``, non-reentrant) turned on, so training it further
    keeps checkpointing."""
    require_peft(pm, "merge_and_unload")
    origin = pm.__dict__.get("_peftfx_origin")
    if origin is None:
        raise PeftfxError("merge_and_unload() needs a model returned by peftfx.apply() or load_adapter() (it keeps "
                          "the module it was traced from).")
    why = not_replayable(pm)
    if why:
        raise PeftfxError(f"merge_and_unload(): {why}; the original class holds float weights. Merge into a "
                          "float base (apply the adapter to the unquantized model).")
    merged = merge(pm)
    left = sorted({r.method for r in merged.peft_info.adapters.values() if not r.merged})
    if left:
        raise PeftfxError(f"merge_and_unload(): adapters of method(s) {left} do not merge into weights (they add "
                          "modules the original architecture lacks); keep the peftfx model, or export it with "
                          "peftfx.export_onnx.")
    out = copy.deepcopy(origin[0])
    target = out.state_dict()
    state = {k: v for k, v in merged.state_dict().items() if k in target}
    out.load_state_dict(state, strict=False)
    for p in out.parameters():
        p.requires_grad_(True)
    if pm.is_gradient_checkpointing and getattr(out, "supports_gradient_checkpointing", False):
        # trained further, the merged model checkpoints as the peftfx model did (non-reentrant, as peftfx.layers)
        enable = getattr(out, "activation_checkpointing_enable", None) or out.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    return out


def save_pretrained(pm: PeftModel, save_directory: str | os.PathLike, **kwargs: Any) -> str:
    """Write the adapter of ``pm`` into ``save_directory`` with Hugging Face's calling convention (a Hugging Face
    PEFT folder by default, other files there kept; ``is_main_process``, ``state_dict``, ``format="peftfx"`` …):
    :func:`peftfx.io.pretrained.save_pretrained`."""
    return _save_pretrained(pm, save_directory, **kwargs)


def generate(pm: PeftModel, *args: Any, **kwargs: Any) -> Any:
    """Hugging Face ``generate`` (greedy, sampling, beam search: the original module's GenerationMixin and
    generation config) with every forward run by ``pm``'s adapted graphs, so every method generates as trained.

    With a KV cache (the default, ``use_cache=True``): the mixin's ``DynamicCache`` is a graph input and output
    (a pytree, so ``torch.export`` traces it), so the prefill (empty cache) and the decode step (one new token,
    a cache of any length) are two graphs, each traced once. Virtual-token methods follow Hugging Face PEFT:
    prompt tuning / p-tuning put their N tokens before the prompt at the prefill step only (the cache then holds
    them; later steps get the attention mask with N leading ones, positions from the cache length, no
    ``position_ids``); prefix tuning keeps its key/value prefixes in the attention ops of every step (the cache
    holds the real tokens; positions are the mixin's, shifted by N in the graph). ``use_cache=False`` runs the
    whole sequence at every step. Encoder-decoder models (T5, BART; site adapters only): the mixin's
    ``get_encoder()`` call runs the adapted graph too, and the decoder steps take its ``EncoderDecoderCache``
    (a pytree by transformers' generic Cache registration)."""
    require_peft(pm, "generate")
    origin = pm.__dict__.get("_peftfx_origin")
    source = None if origin is None else origin[0]
    variants = pm.peft_variants
    if source is None or variants is None or not callable(getattr(source, "generate", None)):
        raise PeftfxError("generate() needs a model returned by peftfx.apply() from a Hugging Face model with "
                          "generate() (a GenerationMixin).")
    seq2seq = bool(getattr(getattr(source, "config", None), "is_encoder_decoder", False))
    if seq2seq and any(in_cache(r) or getattr(r, "graph_level", False) for r in pm.peft_info.rules):
        raise PeftfxError("generate() on an encoder-decoder model runs site adapters (LoRA, IA3, DoRA, VeRA, "
                          "Houlsby); virtual-token methods are not supported there yet. Call the model in a "
                          "decoding loop of your own (peft(input_ids=…, decoder_input_ids=…)), or export with "
                          "peftfx.export_onnx.")
    use_cache = kwargs.pop("use_cache", None)
    use_cache = getattr(source.generation_config, "use_cache", True) if use_cache is None else bool(use_cache)
    if seq2seq and not use_cache:
        raise PeftfxError("generate() on an encoder-decoder model runs with the KV cache (the default); "
                          "use_cache=False is not supported there. Drop use_cache=False (same tokens).")
    if use_cache:
        _register_cache_pytrees()
    session: dict = {}                                  # this call's session (peftfx._stepgraph)
    step = functools.partial(_step, pm, variants, session)
    forward = functools.wraps(source.forward)(step)    # the mixin reads forward's signature (position_ids …)
    source.__dict__["forward"] = forward          # the mixin calls self(...): route it to the adapted graphs
    if seq2seq:                                   # the mixin runs get_encoder() itself: route it here too
        source.__dict__["get_encoder"] = lambda *a, **k: _Encoder(pm, variants, session)
    try:
        return source.generate(*args, use_cache=use_cache, **kwargs)
    finally:
        source.__dict__.pop("forward", None)
        source.__dict__.pop("get_encoder", None)


class _Encoder(nn.Module):
    """The encoder as Hugging Face's generate calls it (``get_encoder()(input_ids=…, attention_mask=…)``), run by
    the adapted graphs: the whole model with a one-token decoder input, of whose output only the encoder's last
    hidden state is kept (the decoder token costs one step and does not touch the encoder)."""

    def __init__(self, pm: PeftModel, variants: Any, session: dict):
        super().__init__()
        self.__dict__.update(pm=pm, variants=variants, session=session)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=True, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        if inputs_embeds is not None or output_attentions or output_hidden_states:
            raise PeftfxError("generate() on an encoder-decoder model takes input_ids (not inputs_embeds) and no "
                              "output_attentions / output_hidden_states.")
        start = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
        out = self.variants.call(self.pm, (), {"input_ids": input_ids, "attention_mask": attention_mask,
                                               "decoder_input_ids": start}, session=self.session)
        return BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)


def _step(pm: PeftModel, variants: Any, session: dict, *args: Any, **kw: Any) -> Any:
    """One forward of the generation loop, as Hugging Face PEFT runs it for the model's methods."""
    virtual = 0 if variants.disabled else sum(getattr(r, "num_virtual_tokens", 0) for r in pm.peft_info.rules
                                              if in_cache(r))
    if virtual:      # as HF PEFT: no position_ids for prompt tuning / p-tuning; positions count the virtual tokens
        kw.pop("position_ids", None)
    name = "cache" if "cache" in kw else "past_key_values"
    cache = kw.get(name)
    if not kw.get("use_cache") or cache is None:
        kw.pop("use_cache", None)
        kw.pop(name, None)
        return variants.call(pm, args, kw, session=session)
    filled = cache.get_seq_length() > 0
    _check_cache(cache, filled)
    mask = kw.get("attention_mask")
    if virtual and filled and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], virtual), mask], 1)   # the cached tokens
    return variants.call(pm, args, kw, cached=bool(virtual) and filled, session=session)


def _check_cache(cache: Any, filled: bool) -> None:
    """The graphs take transformers' ``DynamicCache`` (a pytree of its key/value tensors). Sliding-window layers
    of an empty one become plain ``DynamicLayer``\\ s: the window's bookkeeping (tokens seen so far, a Python int)
    cannot live in a graph that is traced once for every step, while a layer holding every token is exact — the
    model's sliding-window mask still limits attention to the window (memory grows with the sequence, as for
    full attention). Other caches (static, quantized, offloaded, encoder-decoder) are refused, saying what to
    use."""
    from transformers.cache_utils import (
        DynamicCache,
        DynamicLayer,
        DynamicSlidingWindowLayer,
        EncoderDecoderCache,
    )

    if type(cache) is EncoderDecoderCache:        # self- and cross-attention: each a DynamicCache
        _check_cache(cache.self_attention_cache, filled)
        _check_cache(cache.cross_attention_cache, filled)
        return
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
        raise PeftfxError(f"generate() runs peftfx's traced graphs with transformers' DynamicCache; this call uses "
                          f"a {type(cache).__name__}{' with offloading' if type(cache) is DynamicCache else ''}, "
                          "which they cannot take. Leave cache_implementation unset (or 'dynamic') and pass no "
                          "cache object — the tokens are the same — or pass use_cache=False.")
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer:
            if filled:
                raise PeftfxError("generate() was given a DynamicCache whose sliding-window layers already hold "
                                  "tokens; peftfx's graphs need full layers. Pass no cache (or an empty one).")
            cache.layers[i] = DynamicLayer()
        elif type(layer) is not DynamicLayer:
            raise PeftfxError(f"generate(): cache layer {i} is a {type(layer).__name__}; peftfx's graphs take "
                              "DynamicLayer caches only. Pass no cache object, or use_cache=False.")


def _register_cache_pytrees() -> None:
    """Make transformers' ``DynamicCache`` a pytree node (flattened to its key and value tensors), so a cache is
    an ordinary graph input and output for ``torch.export`` (transformers' own registration, idempotent)."""
    try:
        from transformers.integrations.executorch import (
            register_dynamic_cache_export_support,
        )
    except ImportError as e:       # pragma: no cover - transformers without export support
        raise PeftfxError("generate() with a KV cache needs transformers ≥ 5 (its DynamicCache export support); "
                          "pass use_cache=False to decode without a cache.") from e
    register_dynamic_cache_export_support()
    try:            # an encoder-decoder's cache: transformers' generic Cache registration (objects as they are)
        from transformers.cache_utils import EncoderDecoderCache
        from transformers.exporters.exporter_dynamo import register_pytree_node
    except ImportError:        # pragma: no cover - an older transformers: encoder-decoder caches stay untraceable
        return
    register_pytree_node(EncoderDecoderCache)


register_service("save_pretrained", save_pretrained)
register_service("generate", generate)
register_service("base_model", backbone)
