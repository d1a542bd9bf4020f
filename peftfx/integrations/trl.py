"""TRL (``trl`` 1.16): what its trainers need from a peftfx model.

``SFTTrainer`` needs nothing more than ``peft.base_model`` (:mod:`peftfx.integrations.backbone`). ``DPOTrainer`` and
``KTOTrainer`` score a *reference* model; ``GRPOTrainer`` too when ``beta`` > 0. How TRL 1.16 decides (read from its
source): every trainer asks ``accelerate.utils.is_peft_model(model)``, which is ``isinstance(model,
peft.PeftModel)`` after unwrapping DDP/FSDP — nothing duck-typed (``disable_adapter``, ``peft_config`` are only
touched once that test passed). For such a model and ``ref_model=None`` DPO/KTO first copy the model's adapter
into a frozen adapter ``"ref"`` and later run the reference with ``trl.trainer.utils.use_adapter`` (the ``"ref"``
adapter, or ``disable_adapter()``); GRPO disables the adapter. A peftfx model is not a ``peft.PeftModel``, so with
``ref_model=None`` TRL would load a second base from ``config._name_or_path`` — unless ``precompute_ref_log_probs=True``:
then DPO and KTO keep no reference model for any model and score the dataset once, before training, with the model
as it starts. That needs no peftfx call at all and is exactly HF PEFT's reference (the starting adapter, whatever it
is)::

    trainer = DPOTrainer(model=peft, ref_model=None, args=DPOConfig(precompute_ref_log_probs=True, ...), ...)

(one extra pass over the dataset; not for online data). Otherwise pass :func:`reference_model`::

    trainer = DPOTrainer(model=peft, ref_model=peftfx.integrations.trl.reference_model(peft), ...)   # KTOTrainer too

It is a parameterless module whose forward runs ``peft`` inside ``disable_adapter()`` — the base model's outputs
from the same weights, no second copy in memory. That is TRL's PEFT reference whenever the adapter starts as the
identity (a fresh LoRA: B = 0; IA3: ones), which is what ``peftfx.apply`` gives; for an adapter that was already
trained when DPO/KTO starts, TRL's reference is a frozen copy of it, which this module does not provide. It holds
``peft`` by reference (not as a submodule), so preparing it for evaluation (``.eval()``, accelerate) does not switch
the trained model's mode. ``GRPOTrainer`` has no ``ref_model`` argument: with its default ``beta=0.0`` it needs no
reference and takes a peftfx model as is (completions come from ``peft.generate``); with ``beta`` > 0 it loads the
reference from ``config._name_or_path`` for any non-``peft.PeftModel``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .._errors import PeftfxError
from ..model import PeftModel

__all__ = ["ReferenceModel", "reference_model"]


class ReferenceModel(nn.Module):
    """``ref(**batch)`` = ``peft(**batch)`` with every adapter off (see the module docstring)."""

    def __init__(self, pm: PeftModel):
        super().__init__()
        if not isinstance(pm, PeftModel) or pm.peft_variants is None:
            raise PeftfxError("reference_model() takes a model returned by peftfx.apply() (it runs the base model "
                              "through disable_adapter()).")
        self._peft = [pm]

    @property
    def peft(self) -> PeftModel:
        return self._peft[0]

    @property
    def config(self) -> Any:
        return self.peft.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft.disable_adapter():
            return self.peft(*args, **kwargs)

    @property
    def base_model(self) -> Any:
        """The base model's backbone (TRL's fused LM head calls it): ``peft.base_model`` with the adapters off."""
        backbone = self.peft.base_model

        def run(*args: Any, **kwargs: Any) -> Any:
            with self.peft.disable_adapter():
                return backbone(*args, **kwargs)

        return run

    def get_output_embeddings(self) -> Any:
        return self.peft.get_output_embeddings()


def reference_model(pm: PeftModel) -> ReferenceModel:
    """The base model of ``pm`` as a reference for TRL's DPO/KTO/GRPO (see the module docstring)."""
    return ReferenceModel(pm)
