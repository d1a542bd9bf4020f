"""The backbone of a peftfx causal LM: the hidden states that feed its output head, computed by the adapted graphs.

Hugging Face models expose their backbone as ``model.base_model`` (``LlamaForCausalLM.model``); TRL's trainers
(``SFTTrainer``, ``DPOTrainer`` through ``trl.trainer.utils.add_fused_lm_head``) call it and then project the
hidden states through ``model.get_output_embeddings()`` in chunks, never materialising the logits. A peftfx model's
graph runs the whole model as one traced program, so ``peft.base_model`` is a :class:`Backbone`: for each call it
takes the graph of the call's mode and signature (the adapters included; inside ``disable_adapter()`` the base
model's),
forks it with the output replaced by the input of the head's weight matmul (the matmul whose weight is the
original module's ``get_output_embeddings().weight``), drops what only fed the head, and runs that; it returns a
``BaseModelOutputWithPast(last_hidden_state=…)``. The fork is cached per graph and rebuilt when the graph changes.
A head that carries adapters (a LoRA on ``lm_head``, tied trainable tokens) is refused: the caller would project
through the bare weight and silently drop them.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from .._errors import PeftfxError
from .._util import call_reading
from ..model import PeftModel, adapter_of, call_key, output_chain

__all__ = ["Backbone", "backbone"]


class Backbone:
    """``peft.base_model``: a callable returning the adapted model's hidden states before its output head."""

    def __init__(self, pm: PeftModel):
        self.pm = pm

    def __repr__(self) -> str:
        return f"Backbone({type(self.pm).__name__})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        pm = self.pm
        variants = pm.peft_variants
        if variants is None:
            raise PeftfxError("base_model needs a model returned by peftfx.apply() (it keeps the original module).")
        kwargs.pop("output_router_logits", None)
        kwargs.pop("return_dict", None)
        bound = variants.bind(args, kwargs)
        key = call_key(bound, pm.training, variants.dynamic)
        if variants.disabled:                  # inside disable_adapter(): the base model's graph
            key += ("base",)
        gm = variants.graph_for(pm, key, bound)
        fork = _backbone_graph(gm, pm)
        return BaseModelOutputWithPast(last_hidden_state=fork._graph_forward(**bound))


def backbone(pm: PeftModel) -> Backbone:
    return Backbone(pm)


def _backbone_graph(gm: PeftModel, home: PeftModel) -> PeftModel:
    version = gm.__dict__.get("_peftfx_version")
    cached = gm.__dict__.get("_peftfx_backbone")
    if cached is not None and cached[0] == version and cached[1].training == home.training:
        return cached[1]
    source = home.__dict__["_peftfx_origin"][0]
    head = source.get_output_embeddings() if hasattr(source, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        raise PeftfxError(f"{type(source).__name__} has no output embeddings (get_output_embeddings()); base_model is "
                          "for causal LMs.")
    fork = gm.fork()
    site = _head_node(fork, weight)
    if output_chain(site) or any(adapter_of(a) for a in site.all_input_nodes):
        raise PeftfxError("the output head carries an adapter (LoRA on lm_head, tied trainable tokens …); a caller "
                          "projecting base_model's hidden states through get_output_embeddings().weight would drop "
                          "it. Keep the head free of adapters for TRL's fused LM head.")
    hidden = site.args[0]
    out = next(n for n in fork.graph.nodes if n.op == "output")
    out.args = (hidden,)
    fork.graph._codegen = fx.graph.CodeGen()
    fork.graph.eliminate_dead_code()
    fork.graph.lint()
    fork.__dict__["_peftfx_quiet"] = True
    fork.recompile()
    fork.train(home.training)
    gm.__dict__["_peftfx_backbone"] = (version, fork)
    return fork


def _head_node(gm: PeftModel, weight) -> fx.Node:
    import torch

    node = call_reading(gm, torch.ops.aten.linear.default, weight, 1)
    if node is not None:
        return node
    raise PeftfxError("no weight matmul of this graph reads the output head's weight; base_model cannot find "
                      "where the hidden states meet the head.")
