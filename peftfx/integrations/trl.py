"""TRL (``trl`` ≥ 1.16): what its trainers need from a peftfx model.

``SFTTrainer`` needs nothing more than ``peft.base_model`` (:mod:`peftfx.integrations.backbone`). ``DPOTrainer``
(and KTO/GRPO with a KL term) score a *reference* model. For a Hugging Face PEFT model TRL passes ``ref_model=None``
and disables the adapter; it recognises that case with ``isinstance(model, peft.PeftModel)``, which a peftfx model
is not — with ``ref_model=None`` TRL would instead load a second copy of the base from ``config._name_or_path``. So
pass :func:`reference_model`::

    trainer = DPOTrainer(model=peft, ref_model=peftfx.integrations.trl.reference_model(peft), ...)

It is a parameterless module whose forward runs ``peft`` inside ``disable_adapter()`` — the base model's outputs
from the same weights, no second copy in memory, exactly TRL's PEFT path. It holds ``peft`` by reference (not as a
submodule), so preparing it for evaluation (``.eval()``, accelerate) does not switch the trained model's mode.
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
