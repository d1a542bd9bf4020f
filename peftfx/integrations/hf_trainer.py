"""Hugging Face ``Trainer`` (and TRL's trainers, its subclasses): adapter-only checkpoints, and resuming from them.

    trainer = Trainer(model=peft, args=args, train_dataset=ds)     # or trl.SFTTrainer(...)
    peftfx.integrations.hf_trainer.adapter_checkpoints(trainer)
    trainer.train()                                                 # checkpoint-N/ holds the adapter (kB), not the model
    trainer.train(resume_from_checkpoint=True)                      # loads the adapter back into the same model

Why a call: ``Trainer`` recognises a PEFT model by ``isinstance(model, peft.PeftModel)``
(``transformers.trainer_utils._is_peft_model``; accelerate's ``is_peft_model`` likewise), which a peftfx model is
not and cannot honestly claim to be. For any other module ``Trainer._save`` writes ``model.state_dict()`` — the
whole base — and ``_load_from_checkpoint`` reads it back. :func:`adapter_checkpoints` replaces exactly these two
methods on the one trainer instance (nothing global is patched): ``_save`` writes the adapter with
``model.save_pretrained`` (a Hugging Face PEFT folder, ``adapter_model.safetensors`` + ``adapter_config.json``, or
the peftfx format for methods HF PEFT has no form for) plus what ``Trainer._save`` writes besides the model (the
processing class, ``training_args.bin``); ``_load_from_checkpoint`` copies a saved adapter's tensors into the
model's adapters (:func:`peftfx.io.checkpoint.load_adapter_weights`). Optimizer, scheduler, RNG and trainer state
are the Trainer's own files, untouched, so a resumed run continues exactly.
"""
from __future__ import annotations

import logging
import os
import types
from typing import Any

from .._errors import CheckpointError, PeftfxError
from .._fs import write_files_into
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


def _write_adapter(model: PeftModel, output_dir: str) -> list[str]:
    """Write the adapter files into ``output_dir`` (which may hold other files: checkpoints, optimizer state)."""
    def write(tmp: str) -> str:
        folder = os.path.join(tmp, "adapter")
        try:
            model.save_pretrained(folder)                  # the Hugging Face PEFT format
        except CheckpointError as e:
            log.info("adapter has no Hugging Face PEFT form (%s); writing the peftfx format", e)
            model.save_pretrained(folder, format="peftfx")
        return folder

    return write_files_into(output_dir, write, ".peftfx-trainer-")


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
        names = _write_adapter(_peft_model(self), output_dir)
        log.info("saved adapter-only checkpoint %s to %s", names, output_dir)
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

    trainer._save = types.MethodType(_save, trainer)
    trainer._load_from_checkpoint = types.MethodType(_load_from_checkpoint, trainer)
    return trainer
