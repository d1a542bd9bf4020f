"""The Hugging Face PEFT converter contract and registry, and what the converters beside each method share.

An HF PEFT folder holds ``adapter_config.json`` (its ``"peft_type"`` names the method) and
``adapter_model.safetensors``, whose keys name the adapted module with the adapter name stripped:
``base_model.model.<module path>.lora_A.weight``. peftfx keys are ``<site key>.<method>.<parameter>``
(``model.layers.0.self_attn.q_proj.lora.lora_A``). A site's key is its module path, so the two map one to one.

A method's converter lives beside it (``lora_hf.py`` next to ``lora.py``) and registers under its ``peft_type``
with :func:`register_converter`; it is a small class with

  ``peft_type``                         ``"LORA"``
  ``methods``                           the peftfx method names it writes (``("lora", "dora")``)
  ``read(config, tensors) → Imported``  the rules to apply, and the HF key of each adapter parameter;
                                        raises :class:`CheckpointError` naming every config field it cannot
                                        honour (:func:`check_fields`) — nothing is silently ignored
  ``write(model, records) → (config, tensors)``   the method's config fields and HF-named tensors

Nothing outside a converter branches on a method. Reading and writing folders is :mod:`peftfx.io.hf`.
Converters read an HF config into peftfx rules (``target_modules`` names become name selectors,
``layers_to_transform`` a layer selector, ``exclude_modules`` a negated one) and write exact module paths back.

Virtual-token methods:
HF PEFT saves these as one tensor, ``prompt_embeddings``: the virtual-token embeddings ``[N, d]`` (prompt tuning,
p-tuning) or the key/value prefixes ``[N, L·2·Dkv]`` (prefix tuning) — for p-tuning and projected prefixes the
*output* of the prompt encoder, which HF PEFT loads (inference mode, its default) as a plain table and no longer
runs the encoder. So an HF P_TUNING folder loads as :class:`~peftfx.methods.prompt.PromptTuning` holding that
output, and a projected PREFIX_TUNING folder as an unprojected :class:`~peftfx.methods.prefix.PrefixTuning`:
outputs are identical, the encoder weights were never in the file. Writing goes the same way: the peftfx
encoder is evaluated and its output saved, as HF PEFT's own ``save_pretrained`` does.

Outputs: HF PEFT returns N + S logits for a causal LM where peftfx returns the S real ones. Written folders say
``task_type`` CAUSAL_LM for ``…ForCausalLM`` models, FEATURE_EXTRACTION otherwise (HF's SEQ_CLS/TOKEN_CLS
wrappers would expect a trained copy of the head in the file); ``num_layers``, ``token_dim`` and
``num_attention_heads`` are left for HF PEFT to fill from the model's config, as it does for its own configs.
Encoder-decoder models (``num_transformer_submodules`` 2) are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .._errors import CheckpointError
from .._saferegex import compile_safe
from ..model import AdapterRecord, PeftModel
from ..rules import Selector, select
from .base import MethodConfig

__all__ = ["CONVERTERS", "register_converter", "Imported", "check_fields", "module_path", "PREFIX", "HINTS",
           "adapter_paths", "hf_targets", "pattern_value", "records_of", "KEY", "check_virtual", "folded_tokens",
           "virtual_common", "is_mha_out_proj", "mha_out_proj_paths", "hf_shape"]

PREFIX = "base_model.model."

#: fields every HF config may carry that do not change the adapter's arithmetic
COMMON_FIELDS = frozenset({"peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode",
                           "peft_version", "auto_mapping"})

CONVERTERS: dict[str, type] = {}


def register_converter(cls: type) -> type:
    """Register a converter class (see the module docstring) under its ``peft_type``."""
    CONVERTERS[cls.peft_type] = cls
    return cls


@dataclass
class Imported:
    """What a converter's ``read`` returns."""

    rules: list[MethodConfig]
    hf_key: Callable[[AdapterRecord, str], str]        # (adapter record, peftfx parameter name) → HF key
    consumed: set[str] = field(default_factory=set)    # other HF keys the converter used (e.g. shared matrices)
    finish: Callable[[dict[str, nn.Module]], None] | None = None   # after the parameters are filled


# ------------------------------------------------------------------------------------------- helpers
def _neutral(value: Any) -> bool:
    return value is None or value is False or value == "none" or (isinstance(value, (str, list, dict, tuple))
                                                                  and len(value) == 0)


def check_fields(config: dict[str, Any], honoured: set[str] | frozenset[str],
                 hints: dict[str, str] | None = None) -> None:
    """Raise naming every field that is neither honoured nor at a neutral value (None, False, empty,
    ``"none"``): a value other than the default that peftfx cannot reproduce must never be dropped."""
    bad = [k for k, v in config.items() if k not in honoured and k not in COMMON_FIELDS and not _neutral(v)]
    if not bad:
        return
    hints = hints or {}
    lines = [f"{k}={config[k]!r}" + (f": {hints[k]}" if k in hints else "") for k in sorted(bad)]
    raise CheckpointError(
        f"this Hugging Face {config.get('peft_type')} adapter uses option(s) peftfx cannot honour:\n  "
        + "\n  ".join(lines) + "\nLoad it with the peft package instead, or retrain without these options.")


def module_path(record: AdapterRecord) -> str:
    """The HF module path of an adapter's site (a MultiheadAttention's ``<mha>.out_proj`` is
    ``<mha>.base_layer.out_proj`` there: HF wraps the attention module first); an error for sites HF PEFT cannot
    address."""
    site = record.site
    if site["key"] != site["path"] or not site["path"]:
        raise CheckpointError(
            f"adapter {record.name} sits on site {site['key']!r}: a {site['op']} on parameter {site['weight']!r} "
            f"inside module {site['path'] or '<root>'!r}, not a module's own weight. HF PEFT names adapters by "
            "module and cannot store it; narrow the rule's targets to Linear/Conv1D/Embedding modules "
            "(select.type('Linear', 'Conv1D', 'Embedding')) or save in the peftfx format.")
    if is_mha_out_proj(site):
        return site["path"][: -len(".out_proj")] + _MHA_OUT
    return site["path"]


HINTS = {
    "bias": "HF PEFT trains the base biases too; peftfx keeps every base parameter frozen",
    "lora_bias": "a bias on LoRA's B is not supported",
    "layer_replication": "peftfx does not replicate layers",
    "target_parameters": "bare nn.Parameter targets (MoE experts) are supported for LoRA only",
    "use_qalora": "QA-LoRA pools the input; not supported",
    "megatron_config": "Megatron parallel layers are not supported",
}

#: module classes HF PEFT's LoRA adapts (a MultiheadAttention as a whole: its in- and out-projections)
_MODULE_TYPES = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention")


def adapter_paths(tensors: dict[str, torch.Tensor], marker: str) -> list[str]:
    """Module paths of the keys ``base_model.model.<path>.<marker>…``, in file order."""
    out = [k[len(PREFIX):].split("." + marker, 1)[0] for k in tensors
           if k.startswith(PREFIX) and ("." + marker) in k]
    return list(dict.fromkeys(out))


def hf_targets(config: dict[str, Any], paths: list[str]) -> Selector:
    """HF's module matching as a selector: a list of names matches a module equal to a name or ending in
    ``.name``; a string is a full-match regex; ``all-linear`` is whatever the file holds."""
    tm = config.get("target_modules")
    if tm is None or tm == "all-linear":
        sel = select.name(*paths)
    elif isinstance(tm, str):
        sel = select.regex(tm)
    else:
        sel = select.name(*tm)
        layers = config.get("layers_to_transform")
        if layers is not None and layers != []:          # HF applies layers only to list targets
            layers = [layers] if isinstance(layers, int) else list(layers)
            pattern = config.get("layers_pattern")
            if pattern:
                pats = [pattern] if isinstance(pattern, str) else list(pattern)
                sel = sel & select.regex(rf"(?:.*?\.)?(?:{'|'.join(pats)})\.(?:{'|'.join(map(str, layers))})\..*")
            else:
                sel = sel & select.layer(layers)
    ex = config.get("exclude_modules")
    if ex:
        sel = sel & ~(select.regex(ex) if isinstance(ex, str) else select.name(*ex))
    return sel


def pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """HF's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)`` (matched in linear
    time by :mod:`peftfx._saferegex`: a pattern from a file cannot hang the load)."""
    for k, v in (patterns or {}).items():
        if compile_safe(rf"(.*\.)?({k})").fullmatch(path):
            return v
    return default


def records_of(model: PeftModel, records: list[AdapterRecord], types: tuple[str, ...] = _MODULE_TYPES,
               method: str = "") -> list[tuple[AdapterRecord, Any, str]]:
    """(record, adapter module, HF module path) per record; an error for a module class HF PEFT's ``method``
    does not adapt (``types``)."""
    out = []
    for rec in records:
        path = module_path(rec)
        if rec.site.get("module_type") not in types and not _subclass_of(model, rec.site.get("path", ""), types):
            raise CheckpointError(
                f"adapter {rec.name} sits on a {rec.site.get('module_type')!r} module; Hugging Face PEFT{method} "
                f"adapts {', '.join(types)} modules only. Save in the peftfx format instead.")
        out.append((rec, model.get_submodule(rec.name), path))
    return out


def _subclass_of(model: PeftModel, path: str, types: tuple[str, ...]) -> bool:
    """Whether the original module at ``path`` subclasses one of torch's (or transformers' ``Conv1D``) classes named
    in ``types``, as HF PEFT's isinstance checks take it (Falcon's ``FalconLinear`` is an ``nn.Linear``)."""
    origin = model.__dict__.get("_peftfx_origin")
    try:
        mod = origin[0].get_submodule(path) if origin is not None and path else None
    except AttributeError:
        return False
    return mod is not None and any(c.__name__ in types and c.__module__.startswith(("torch.nn.", "transformers."))
                                   for c in type(mod).__mro__[1:])


def is_mha_out_proj(site: dict[str, Any]) -> bool:
    """Whether a site is the out-projection of an ``nn.MultiheadAttention`` (read inside the attention module,
    never called): HF PEFT adapts it as part of the attention module, never on its own."""
    return site.get("module_type") == "MultiheadAttention" and site["path"].endswith(".out_proj")


_MHA_OUT = ".base_layer.out_proj"


def mha_out_proj_paths(paths: list[str]) -> dict[str, tuple[str, str]]:
    """HF path → (peftfx site key, HF path of its attention module) for every ``<mha>.base_layer.out_proj`` of a
    file whose ``<mha>`` holds adapter tensors too: HF PEFT adapted the MultiheadAttention ``<mha>`` as a whole
    (its ``target_modules`` names only ``<mha>``, and its rank and alpha hold for both projections)."""
    have = set(paths)
    return {p: (p[: -len(_MHA_OUT)] + ".out_proj", p[: -len(_MHA_OUT)]) for p in paths
            if p.endswith(_MHA_OUT) and p[: -len(_MHA_OUT)] in have}


def hf_shape(record: AdapterRecord, vector: torch.Tensor, position: str) -> torch.Tensor:
    """A per-feature vector in HF PEFT's layout: ``[1, C, 1, …]`` on a convolution, else ``[n, 1]`` for output
    and ``[1, n]`` for input scaling."""
    conv = record.site.get("conv")
    if conv is not None:
        return vector.reshape(1, -1, *([1] * conv["dims"]))
    return vector.reshape(-1, 1) if position == "output" else vector.reshape(1, -1)


KEY = "prompt_embeddings"
#: present in every prompt-learning config; sizes HF fills from the model, or the init of values the file holds
_SHAPE_FIELDS = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                           "num_layers"})


def check_virtual(config: dict[str, Any], honoured: frozenset[str]) -> int:
    check_fields(config, _SHAPE_FIELDS | honoured, HINTS)
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(f"num_transformer_submodules={config['num_transformer_submodules']!r}: virtual "
                              "tokens for both encoder and decoder (encoder-decoder models) are not supported.")
    return int(config["num_virtual_tokens"])


def folded_tokens(model: PeftModel, records: list[AdapterRecord]) -> torch.Tensor:
    """The virtual-token tensor the one adapter produces (its encoder evaluated in eval mode)."""
    if len(records) != 1:
        raise CheckpointError(f"expected one virtual-token adapter, found {len(records)}.")
    module = model.get_submodule(records[0].name)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module().detach()
    finally:
        module.train(was)


def _task(model: PeftModel) -> str:
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else "FEATURE_EXTRACTION"


def virtual_common(model: PeftModel, table: torch.Tensor) -> dict[str, Any]:
    return {"num_virtual_tokens": table.shape[0], "num_transformer_submodules": 1, "token_dim": None,
            "num_layers": None, "num_attention_heads": None, "task_type": _task(model), "modules_to_save": None}
