"""What every Hugging Face PEFT config may carry beside its method: ``modules_to_save`` (trained copies of whole
modules) and ``trainable_token_indices`` (trained embedding rows), and the fields that say which model the adapter
belongs to (``base_model_name_or_path``, ``auto_mapping``, ``task_type``).

HF PEFT 0.21 writes a saved module's copy under the module's own parameter names (``base_model.model.score.weight``;
older files: ``….score.modules_to_save.default.weight``, read too) and trainable rows as
``base_model.model.<embedding>.token_adapter.trainable_tokens_delta``. A tied LM head shares the embedding's rows
and has no key of its own. ``task_type`` ``SEQ_CLS``/``TOKEN_CLS``/``QUESTION_ANS`` make HF add its default head
names (``classifier``, ``score``, ``qa_outputs``) to ``modules_to_save``; a name without tensors in the file is a
module the model did not have, and is left out (as HF PEFT does).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from .._errors import CheckpointError
from ..methods._hf import PREFIX, Imported
from ..model import AdapterRecord, PeftModel

__all__ = ["AUX_METHODS", "combine", "heads_saved", "model_fields", "read_aux", "task_type_of", "write_aux"]

AUX_METHODS = ("modules_to_save", "trainable_tokens")
_DELTA = "token_adapter.trainable_tokens_delta"
_OLD_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")

#: the head class suffix → HF PEFT task_type (PEFT_TYPE_TO_... MODEL_TYPE_TO_PEFT_MODEL_MAPPING keys)
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
          ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def _leaf(name: str | None, default: str) -> str:
    return name.rsplit(".", 1)[-1] if name else default


def _key(rec: AdapterRecord, pname: str) -> str:
    """The HF key of an aux adapter's parameter."""
    path = rec.site["path"]
    if rec.method == "trainable_tokens":
        return f"{PREFIX}{path}.{_DELTA}"
    leaf = _leaf(rec.site.get("weight") if pname == "weight" else rec.site.get("bias"), pname)
    return f"{PREFIX}{path}.{leaf}"


# ------------------------------------------------------------------------------------------- read
def read_aux(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Imported]:
    """(the config without the aux fields, the aux rules with their keys). Renames old-style copy keys in place."""
    from ..methods.modules_to_save import ModulesToSave
    from ..methods.trainable_tokens import TrainableTokens
    from ..rules import select

    for k in [k for k in tensors if _OLD_COPY.search(k)]:
        tensors[_OLD_COPY.sub(".", k, count=1)] = tensors.pop(k)
    config = dict(config)
    mts, tti = config.pop("modules_to_save", None), config.pop("trainable_token_indices", None)
    rules, consumed = [], set()
    if mts:
        if isinstance(mts, str) or not isinstance(mts, list):
            raise CheckpointError(f"modules_to_save must be a list of module names, got {mts!r}")
        present = []
        for name in mts:
            hit = [k for k in tensors if k.startswith(PREFIX) and _inside(k[len(PREFIX):], name)
                   and ".lora_" not in k and _DELTA not in k and not _is_method_key(k)]
            if hit:
                present.append(name)
                consumed.update(hit)
        if present:
            rules.append(ModulesToSave(names=tuple(present)))
    if tti:
        if isinstance(tti, dict):
            for name, idx in tti.items():
                rules.append(TrainableTokens(token_indices=tuple(idx), targets=select.name(name)))
        else:
            rules.append(TrainableTokens(token_indices=tuple(tti)))
        consumed.update(k for k in tensors if k.endswith(_DELTA))
    return config, Imported(rules, _key, consumed)


def _inside(key: str, name: str) -> bool:
    """Whether parameter ``key`` (``classifier.dense.weight``) lies in a module named ``name`` (HF's matching: the
    module path is the name or ends with ``.name``; a dotted name matches as a whole)."""
    module = key.rsplit(".", 1)[0]
    return f".{name}." in f".{module}."


def _is_method_key(k: str) -> bool:
    """Keys of the methods' own tensors (LoRA, IA3, VeRA, DoRA, virtual tokens), never a saved module's."""
    return any(m in k for m in ("ia3_l", "vera_lambda", "lora_magnitude", "prompt_embeddings", "vera_A", "vera_B"))


def combine(main: Imported, aux: Imported) -> Imported:
    """One :class:`Imported` for the converter's rules followed by the aux rules."""
    if not aux.rules:
        return main

    def key(rec: AdapterRecord, pname: str) -> str:
        return aux.hf_key(rec, pname) if rec.method in AUX_METHODS else main.hf_key(rec, pname)

    return Imported(main.rules + aux.rules, key, main.consumed | aux.consumed, main.finish)


# ------------------------------------------------------------------------------------------- write
def write_aux(model: PeftModel, records: list[AdapterRecord]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The aux config fields and tensors of ``records`` (modules_to_save / trainable_tokens adapters)."""
    rules = model.peft_info.rules
    fields: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    names: list[str] = []
    tokens: dict[str, list[int]] = {}
    for rec in records:
        module = model.get_submodule(rec.name)
        rule = rules[rec.rule_index]
        if rec.method == "modules_to_save":
            names += [n for n in rule.names if n not in names]
        elif rec.site.get("kind") == "embedding":
            tokens[rec.site["path"]] = [int(i) for i in rule.token_indices]
        for pname, p in module.named_parameters():
            tensors[_key(rec, pname)] = p
    if names:
        fields["modules_to_save"] = names
    if tokens:
        embeds = [r for r in records if r.method == "trainable_tokens" and "embed" in r.site.get("roles", [])]
        if len(tokens) == 1 and embeds:
            fields["trainable_token_indices"] = next(iter(tokens.values()))
        else:
            fields["trainable_token_indices"] = tokens
    return fields, tensors


#: task types whose HF PEFT wrapper adds these head names to modules_to_save (and then needs them in the file)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def heads_saved(task: str | None, names: list[str]) -> bool:
    """Whether an HF folder may say ``task``: HF PEFT's wrapper for a classification / QA task loads the head's copy
    from the file, so the head must be among the saved modules."""
    heads = _TASK_HEADS.get(task or "")
    return heads is None or any(n in heads for n in names)


def task_type_of(class_name: str) -> str | None:
    """HF PEFT's task_type for a Hugging Face head class name (None for a bare model): transformers' own auto
    mappings (``GPT2LMHeadModel`` is a causal LM), else the class name's suffix."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:                 # pragma: no cover - transformers is a dependency of the HF format
        auto = None
    if auto is not None:
        for mapping, task in (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                              ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                              ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                              ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
                              ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM")):
            names = getattr(auto, mapping, {}).values()
            if any(class_name == n or (isinstance(n, (list, tuple)) and class_name in n) for n in names):
                return task
    return next((t for suffix, t in _TASKS if class_name.endswith(suffix)), None)


def model_fields(model: PeftModel) -> dict[str, Any]:
    """``auto_mapping`` (class and module of the model the adapter was traced from), ``base_model_name_or_path`` when
    its config knows it, and ``task_type`` derived from the class when the method did not set one."""
    origin = model.__dict__.get("_peftfx_origin")
    source = origin[0] if origin is not None else None
    cls = type(source) if source is not None else None
    out: dict[str, Any] = {}
    if cls is not None:
        out["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    name = getattr(getattr(source, "config", None), "_name_or_path", None) or None
    if name:
        out["base_model_name_or_path"] = name
    if cls is not None:
        out["task_type"] = task_type_of(cls.__name__)
    return out
