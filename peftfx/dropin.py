"""The rest of the drop-in face: the user's model class back with merged weights, and ``save_pretrained``.

    merged = peftfx.merge_and_unload(peft)     # the original class (e.g. LlamaForCausalLM), adapters merged
    merged.save_pretrained("merged")           # plain transformers loads it: AutoModelForCausalLM.from_pretrained
    peft.save_pretrained("out")                # the adapter only: a Hugging Face PEFT folder (format="peftfx" too)
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any

from torch import nn

from ._errors import PeftfxError
from .apply import merge
from .integrations.backbone import backbone
from .io.checkpoint import save_adapter
from .model import PeftModel, register_service, require_peft
from .variants import not_replayable

__all__ = ["merge_and_unload", "save_pretrained", "generate"]

log = logging.getLogger(__name__)


def merge_and_unload(pm: PeftModel) -> nn.Module:
    """A copy of the module ``pm`` was traced from (its own class, config and generation utilities) whose weights
    hold every adapter merged by the adapter's own ``merge`` (the same one :func:`peftfx.merge` runs). ``pm`` and
    the original module are unchanged. Adapters that cannot merge (Houlsby, virtual tokens) are an error: they
    are not weights of the original architecture."""
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
    return out


def save_pretrained(pm: PeftModel, save_directory: str | os.PathLike, *, format: str = "hf",
                    adapter: str | None = None, **_: Any) -> str:
    """Write the adapter of ``pm`` to ``save_directory``: a Hugging Face PEFT folder by default (loads with
    ``peft.PeftModel.from_pretrained`` and :func:`peftfx.load_adapter`), ``format="peftfx"`` for methods HF PEFT
    has no form for. Hugging Face's other keywords (``safe_serialization`` …) are accepted and ignored."""
    return save_adapter(pm, save_directory, format=format, adapter=adapter)


def generate(pm: PeftModel, *args: Any, **kwargs: Any) -> Any:
    """Hugging Face ``generate`` (greedy, sampling, beam search: the original module's GenerationMixin and
    generation config) with every forward run by ``pm``'s adapted graphs, so every method generates as trained.
    No KV cache yet: each step runs the whole sequence (``use_cache=False``); the tokens are the cached path's."""
    require_peft(pm, "generate")
    origin = pm.__dict__.get("_peftfx_origin")
    source = None if origin is None else origin[0]
    if source is None or not callable(getattr(source, "generate", None)):
        raise PeftfxError("generate() needs a model returned by peftfx.apply() from a Hugging Face model with "
                          "generate() (a GenerationMixin).")
    if kwargs.pop("use_cache", False):
        log.info("generate: use_cache=True is not supported yet; decoding without a KV cache")

    def forward(*a: Any, **kw: Any) -> Any:
        kw.pop("use_cache", None)
        return pm(*a, **kw)

    source.__dict__["forward"] = forward          # the mixin calls self(...): route it to the adapted graphs
    try:
        return source.generate(*args, use_cache=False, **kwargs)
    finally:
        source.__dict__.pop("forward", None)


register_service("save_pretrained", save_pretrained)
register_service("generate", generate)
register_service("base_model", backbone)
