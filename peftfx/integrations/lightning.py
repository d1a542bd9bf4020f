"""PyTorch Lightning: a callback that turns a LightningModule's model into a peftfx model when fit starts,
as NeMo's ``ModelTransform`` callback does.

    class LitLM(L.LightningModule):
        def __init__(self): super().__init__(); self.model = LlamaForCausalLM(config)
        def training_step(self, batch, i): return self.model(**batch).loss
        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    trainer = L.Trainer(callbacks=[PeftfxCallback(LoRA(rank=8), {"input_ids": ids, "labels": ids},
                                                  save_to="out/adapter")])

The rules are applied in ``setup(stage="fit")``: after the module is built and before Lightning calls
``configure_optimizers`` (``on_fit_start`` comes after it, too late for the optimizer to see the adapters).
A model that already is a peftfx model is left alone, so a resumed or repeated fit does not apply twice.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .._errors import PeftfxError

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError("peftfx.integrations.lightning needs PyTorch Lightning: pip install lightning") from None

__all__ = ["PeftfxCallback"]

log = logging.getLogger(__name__)


class PeftfxCallback(pl.Callback):
    """Apply ``rules`` to ``pl_module.<attr>`` at the start of fit (and optionally quantize the base and
    save the adapter at the end).

    ``example_inputs``: a dict of inputs for tracing, or a callable ``(trainer, pl_module) → dict`` (e.g. a
    batch from ``trainer.datamodule``). ``quantize``: 4 or 8 to put the base in NF4/int8 (QLoRA, see
    :func:`peftfx.quantize`). ``save_to``: a folder for :func:`peftfx.save_adapter` when fit ends."""

    def __init__(self, rules: Any, example_inputs: dict | Callable[..., dict], *, attr: str = "model",
                 quantize: int | None = None, save_to: str | None = None):
        from ..methods import rules_from_data

        super().__init__()
        self.rules = rules_from_data(rules)
        self.example_inputs = example_inputs
        self.attr, self.quantize, self.save_to = attr, quantize, save_to

    def setup(self, trainer, pl_module, stage: str) -> None:
        from ..apply import apply
        from ..model import PeftModel
        from ..quant import quantize

        if stage != "fit":
            return
        model = getattr(pl_module, self.attr, None)
        if model is None:
            raise PeftfxError(f"PeftfxCallback: {type(pl_module).__name__} has no attribute {self.attr!r}; pass "
                              "attr= with the name of the submodule to adapt.")
        if isinstance(model, PeftModel):
            return
        ex = self.example_inputs(trainer, pl_module) if callable(self.example_inputs) else self.example_inputs
        peft = apply(model, self.rules, ex)
        if self.quantize:
            quantize(peft, bits=self.quantize)
        setattr(pl_module, self.attr, peft)
        log.info("PeftfxCallback: applied %d rule(s) to %s.%s", len(self.rules), type(pl_module).__name__, self.attr)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.save_to and trainer.is_global_zero:
            from ..io.checkpoint import save_adapter

            save_adapter(getattr(pl_module, self.attr), self.save_to)
