"""Hugging Face ``Trainer`` (and TRL's trainers, its subclasses): adapter-only checkpoints, and resuming from them.

    trainer = Trainer(model=peft, args=args, train_dataset=ds)     # or trl.SFTTrainer(...)
    peftfx.integrations.hf_trainer.adapter_checkpoints(trainer)
    trainer.train()                                                 # checkpoint-N/ holds the adapter (kB), not the model
    trainer.train(resume_from_checkpoint=True)                      # loads the adapter back into the same model

Why a call (transformers 5.25, read from its source): the Trainer decides by class, never by what a model can do.
``Trainer._save`` calls ``model.save_pretrained(output_dir, state_dict=…, is_main_process=…)`` only when
``isinstance(model, (PreTrainedModel, peft.PeftModel))`` (its local ``supported_classes``, also tried on
``accelerator.unwrap_model(model)``); any other module gets ``safetensors.save_file(model.state_dict(),
"model.safetensors")`` — the whole base. ``_load_from_checkpoint`` and ``_load_best_model`` load adapters only
for ``transformers.trainer_utils._is_peft_model(model)``, i.e. ``isinstance(model, (peft.PeftModel,
peft.PeftMixedModel))``; otherwise they read ``model.safetensors`` with ``load_state_dict(strict=False)``.
accelerate's ``is_peft_model`` is the same ``isinstance``. Neither class can be registered (no ABC), and a peftfx
model is neither (claiming it through ``__class__`` would send HF PEFT's own code paths into it). So
``Trainer(model=peft)`` alone writes full-model checkpoints (they resume, but are the size of the model:
``tests/test_trainer_trl.py`` pins this behaviour, so a transformers that starts duck-typing shows up there).
:func:`adapter_checkpoints` replaces exactly ``_save``, ``_load_from_checkpoint`` and ``_load_best_model`` on the one
trainer instance (nothing global is patched): ``_save`` calls ``model.save_pretrained(output_dir, state_dict=…)``
(:func:`peftfx.io.pretrained.save_pretrained`: a Hugging Face PEFT folder's files, or the peftfx format's for
methods HF PEFT has no form for, added to the folder) plus what ``Trainer._save`` writes besides the model (the
processing class, ``training_args.bin``); ``_load_from_checkpoint`` copies a saved adapter's tensors into the
model's adapters (:func:`peftfx.io.checkpoint.load_adapter_weights`), and so does ``_load_best_model``
(``load_best_model_at_end=True``; the stock one would look for ``pytorch_model.bin`` and fail). Optimizer, scheduler, RNG and trainer state
are the Trainer's own files, untouched, so a resumed run continues exactly. ``trainer.save_model(dir)`` then writes
the adapter folder, which ``peftfx.load_adapter`` and ``peft.PeftModel.from_pretrained`` load.
"""
from __future__ import annotations

import logging
import os
import types
from typing import Any

from .._errors import CheckpointError, PeftfxError
from ..io.checkpoint import load_adapter_weights
from ..model import PeftModel

__all__ = ["adapter_checkpoints", "is_adapter_folder"]

log = logging.getLogger(__name__)

_FILES = (("adapter_model.safetensors", "adapter_config.json"), ("adapter.safetensors", "adapter_config.json"))


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an adapter (either format)."""
    return any(all(os.path.isfile(os.path.join(path, f)) for f in files) for files in _FILES)


def _peft_model(trainer: Any) -> PeftModel:
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    if not isinstance(model, PeftModel):
        raise PeftfxError(f"adapter_checkpoints(trainer): trainer.model is a {type(model).__name__}, not a model "
                          "returned by peftfx.apply().")
    return model


def _write_adapter(model: PeftModel, output_dir: str, state_dict: dict | None) -> None:
    """The adapter's files into ``output_dir`` (which may hold other files: checkpoints, optimizer state)."""
    try:
        model.save_pretrained(output_dir, state_dict=state_dict)          # the Hugging Face PEFT format
    except CheckpointError as e:
        log.info("adapter has no Hugging Face PEFT form (%s); writing the peftfx format", e)
        model.save_pretrained(output_dir, state_dict=state_dict, format="peftfx")


def adapter_checkpoints(trainer: Any) -> Any:
    """Make ``trainer`` (a ``transformers.Trainer`` or subclass holding a peftfx model) write adapter-only
    checkpoints and resume from them; returns ``trainer``. See the module docstring."""
    _peft_model(trainer)
    original_load = trainer._load_from_checkpoint

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        import torch

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        _write_adapter(_peft_model(self), output_dir, state_dict)
        log.info("saved an adapter-only checkpoint to %s", output_dir)
        processor = self.processing_class
        if processor is None and getattr(self.data_collator, "tokenizer", None) is not None:
            processor = self.data_collator.tokenizer
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not is_adapter_folder(resume_from_checkpoint):
            return original_load(resume_from_checkpoint, model)
        load_adapter_weights(_peft_model(self), resume_from_checkpoint)
        log.info("resumed the adapter from %s", resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not is_adapter_folder(best):
            return original_best()
        load_adapter_weights(_peft_model(self), best)
        log.info("loaded the best adapter from %s", best)
        return None

    original_best = trainer._load_best_model
    trainer._save = types.MethodType(_save, trainer)
    trainer._load_from_checkpoint = types.MethodType(_load_from_checkpoint, trainer)
    trainer._load_best_model = types.MethodType(_load_best_model, trainer)
    return trainer
