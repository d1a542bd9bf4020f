"""Several named LoRA adapters on one base model.

    peft = peftfx.apply(model, LoRA(rank=8), ex)             # one adapter; it becomes "default" below
    peftfx.add_adapter(peft, "math", LoRA(rank=4, targets=…))  # or a folder written by save_adapter
    peftfx.set_active(peft, "math")                           # None: disable all (the base model)
    peftfx.combine(peft, {"default": 0.7, "math": 0.3}, name="mix")
    out = peftfx.forward_mixed(peft, ["math", None, "default"], input_ids=ids)   # one adapter per row
    peftfx.save_adapter(peft, "out/math", adapter="math")    # the single-adapter format + "adapter_name"

Each site holds one :class:`~peftfx.multi.container.MultiLoRA` at ``{site}.lora`` with the adapters by name, so
state_dict keys read ``{site}.lora.adapters.<name>.lora_A``. A named adapter saved alone has the plain
single-adapter keys (``{site}.lora.lora_A``): any model loads it with :func:`peftfx.load_adapter`.

Mixed batches route each row by an index set on the model for the next call (:func:`mixed_batch`), not by a
new graph input: the traced graph keeps the user's calling convention (the pytree input spec torch.export
wrote, the keyword names HF Trainer and DDP pass), and the index is read by every site's module in that one
forward. Combination (``combine``): ``"cat"`` (default, HF PEFT's "cat") stacks the pairs, A = [w₁s₁A₁; …],
B = [B₁ … B_k], so ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ exactly (rank Σ rᵢ); ``"linear"`` (HF's "linear", equal ranks) averages
the factors, A = Σ ±√|wᵢsᵢ| Aᵢ, B = Σ √|wᵢsᵢ| Bᵢ, which is not the sum of the deltas (cross terms BᵢAⱼ appear).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import fx, nn

from .._errors import CheckpointError, PeftfxError, RuleError
from .._util import set_submodule
from ..io.peftfx_format import read_adapter
from ..io.state import load_state
from ..methods import rules_from_data
from ..methods.lora import LoRA, LoRAEmbedding, LoRALinear
from ..model import AdapterRecord, PeftInfo, PeftModel, adapter_name, require_peft
from ..passes.base import PassManager
from ..passes.dropout import adapter_mode_pass
from ..passes.freeze import freeze_pass
from ..passes.remove import remove_adapters_pass
from ..passes.splice import splice_pass
from ..plan import plan
from .container import MultiLoRA, lora_factors

__all__ = ["add_adapter", "set_active", "active_adapters", "adapter_names", "delete_adapter", "combine",
           "mixed_batch", "forward_mixed", "adapter_view"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


# ------------------------------------------------------------------------------------------ queries
def adapter_names(pm: PeftModel) -> list[str]:
    """Named adapters in the order they were added (the order of mixed-batch indices)."""
    require_peft(pm, "adapter_names")
    return list(pm.peft_info.multi.get("adapters", {}))


def active_adapters(pm: PeftModel) -> list[str]:
    require_peft(pm, "active_adapters")
    return list(pm.peft_info.multi.get("active", []))


def _containers(pm: PeftModel) -> dict[str, MultiLoRA]:
    return {n: m for n in pm.peft_info.adapters if isinstance(m := pm.get_submodule(n), MultiLoRA)}


def _check_unmerged(pm: PeftModel, what: str) -> None:
    merged = [n for n in _containers(pm) if pm.peft_info.adapters[n].merged]
    if merged:
        raise PeftfxError(f"{what}: adapters are merged into the weights of this model ({merged[0]} …); "
                          "call peftfx.unmerge() first, or work on the unmerged model (merge returns a copy).")


# --------------------------------------------------------------------------------------------- add
def add_adapter(pm: PeftModel, name: str | None, source: Any) -> PeftModel:
    """Add LoRA adapter ``name`` from rules (``LoRA(...)``, a list, dicts, JSON/YAML) or from a folder
    written by :func:`peftfx.save_adapter` (``name=None`` takes the folder's ``adapter_name``). The model's
    existing LoRA adapter becomes "default". The first named adapter is made active; later ones are added
    inactive (as in HF PEFT) — :func:`set_active` them. Nothing changes if anything is wrong."""
    require_peft(pm, "add_adapter")
    tensors = None
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        config, tensors = read_adapter(source)
        rules = rules_from_data(config["rules"])
        name = name or config.get("adapter_name")
        if not name:
            raise CheckpointError(f"{os.fspath(source)} has no adapter_name; pass a name: "
                                  "add_adapter(model, 'name', folder).")
    else:
        rules = rules_from_data(source)
    _check_new(pm, name, rules)
    _check_unmerged(pm, "add_adapter")
    built = _build(pm, rules)                                   # {record name: (match, module)}
    if tensors is not None:
        load_state({k: m for k, (_, m) in built.items()}, tensors, os.fspath(source))
    _convert_default(pm)
    _install(pm, name, rules, built)
    return pm


def _check_new(pm: PeftModel, name: Any, rules: list) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PeftfxError(f"adapter names are identifiers (letters, digits, _ and -, not starting with a digit), "
                          f"got {name!r}.")
    taken = set(adapter_names(pm)) | ({"default"} if _default_records(pm) else set())
    if name in taken:
        raise PeftfxError(f"the model already has an adapter named {name!r} (adapters: {sorted(taken)}); "
                          "delete_adapter() it first or pick another name.")
    bad = [r.name for r in rules if not isinstance(r, LoRA)]
    if bad:
        raise RuleError(f"named adapters are LoRA adapters; got rule(s) of method {bad}. Apply other methods "
                        "with peftfx.apply() (they stay always on).")


_KINDS = ("linear", "linear_t", "embedding")      # what MultiLoRA holds (see .container)


def _build(pm: PeftModel, rules: list) -> dict[str, tuple[Any, nn.Module]]:
    out: dict[str, tuple[Any, nn.Module]] = {}
    matches = plan(pm, rules).matches
    other = sorted({m.site.key for m in matches if m.site.kind not in _KINDS})
    if other:
        raise RuleError(f"named adapters hold LoRA on linear and embedding sites; the rules also select "
                        f"{other[:3]} (a {next(m.site.kind for m in matches if m.site.key == other[0])} site). "
                        "Narrow the targets (e.g. & ~select.type('Conv2d')) or apply LoRA there with peftfx.apply().")
    for m in matches:
        rec = adapter_name(pm, m.site.key, m.rule.name)
        module = m.rule.build(m.site, _site_weight(pm, m.site.weight), m.roles)
        out[rec] = (m, module)
    return out


def _site_weight(pm: PeftModel, name: str) -> torch.Tensor:
    """The site's weight (a dequantized copy when the base is quantized, see :mod:`peftfx.quant`)."""
    try:
        return pm.get_parameter(name)
    except AttributeError:
        pass
    for n in pm.graph.nodes:
        if n.op == "call_module" and n.meta.get("peftfx", {}).get("dequant_of") == name:
            with torch.no_grad():
                return pm.get_submodule(n.target)()
    raise PeftfxError(f"weight {name} is neither a parameter nor a quantized weight of this model")


def _default_records(pm: PeftModel) -> list[str]:
    """Plain (not yet named) LoRA modules of the model: they form the adapter "default"."""
    return [n for n, r in pm.peft_info.adapters.items()
            if isinstance(pm.get_submodule(n), (LoRALinear, LoRAEmbedding))]


def _convert_default(pm: PeftModel) -> None:
    recs = _default_records(pm)
    if not recs:
        return
    info = pm.peft_info
    lora_rules = [i for i, r in enumerate(info.rules) if isinstance(r, LoRA)]
    for n in recs:
        single = pm.get_submodule(n)
        multi = MultiLoRA(isinstance(single, LoRAEmbedding))
        multi.adapters["default"] = single
        multi.active = ("default",)
        set_submodule(pm, n, multi)
    pm.mark_stale()      # other graphs still call the replaced single-adapter modules
    info.multi.setdefault("adapters", {})
    info.multi["adapters"] = {"default": {
        "rules": [info.rules[i] for i in lora_rules],
        "records": {n: lora_rules.index(info.adapters[n].rule_index) for n in recs}},
        **info.multi["adapters"]}
    info.multi["active"] = ["default"]


def _install(pm: PeftModel, name: str, rules: list, built: dict) -> None:
    info = pm.peft_info
    first = not info.multi.get("adapters")
    active = (name,) if first else tuple(info.multi.get("active", ()))
    items = []
    for rec, (m, module) in built.items():
        if rec in info.adapters:
            pm.get_submodule(rec).adapters[name] = module
            continue
        multi = MultiLoRA(m.site.kind == "embedding")
        multi.active = active
        multi.adapters[name] = module
        info.adapters[rec] = AdapterRecord(name=rec, method="lora", rule_index=-1, site=m.site.describe(),
                                           node=m.site.node.name)
        items.append((m.site.node, m.site.op, rec, multi))
    info.multi.setdefault("adapters", {})[name] = {"rules": list(rules),
                                                   "records": {rec: m.rule_index for rec, (m, _) in built.items()}}
    info.multi["active"] = list(active)
    PassManager([splice_pass.bind(items), freeze_pass.bind(), adapter_mode_pass.bind()])(pm)


# ---------------------------------------------------------------------------------- select / delete
def set_active(pm: PeftModel, name: str | Sequence[str] | None) -> PeftModel:
    """Make ``name`` the active adapter (a list: their sum; None: disable all, the base model runs)."""
    require_peft(pm, "set_active")
    names = [] if name is None else [name] if isinstance(name, str) else list(name)
    _known(pm, names)
    _check_unmerged(pm, "set_active")
    for m in _containers(pm).values():
        m.active = tuple(names)
    pm.peft_info.multi["active"] = names
    return pm


def _known(pm: PeftModel, names: Sequence[Any]) -> None:
    known = adapter_names(pm)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PeftfxError(f"unknown adapter(s) {unknown}; this model has {known or 'no named adapters'} "
                          "(add one with peftfx.add_adapter).")


def delete_adapter(pm: PeftModel, name: str) -> PeftModel:
    """Remove adapter ``name`` (its parameters and, where it was a site's only adapter, its node)."""
    require_peft(pm, "delete_adapter")
    _known(pm, [name])
    _check_unmerged(pm, "delete_adapter")
    info = pm.peft_info
    empty = []
    for rec in list(info.multi["adapters"][name]["records"]):
        multi = pm.get_submodule(rec)
        del multi.adapters[name]
        multi.active = tuple(n for n in multi.active if n != name)
        if not len(multi.adapters):
            empty.append(rec)
    remove_adapters_pass(pm, empty)
    del info.multi["adapters"][name]
    info.multi["active"] = [n for n in info.multi["active"] if n != name]
    return pm


# ------------------------------------------------------------------------------------------ combine
def combine(pm: PeftModel, weights: Mapping[str, float], name: str, *, combination: str = "cat") -> PeftModel:
    """Add adapter ``name`` = the weighted combination of existing LoRA adapters (see the module doc:
    ``"cat"`` is exactly ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ at every site; ``"linear"`` is HF PEFT's factor average). Its
    rule is ``LoRA(rank=R, alpha=R)`` (scaling 1) over the union of the sources' sites, so it saves and
    loads like any adapter. It is added inactive."""
    require_peft(pm, "combine")
    if not isinstance(weights, Mapping) or not weights:
        raise PeftfxError("combine() takes a non-empty dict {adapter name: weight}.")
    _known(pm, list(weights))
    bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float)) or not math.isfinite(w)}
    if bad:
        raise PeftfxError(f"combine() weights must be finite numbers, got {bad}.")
    if combination not in ("cat", "linear"):
        raise PeftfxError(f"combination must be 'cat' (exact sum of deltas) or 'linear' (HF PEFT's), got "
                          f"{combination!r}.")
    _check_new(pm, name, [])
    _check_unmerged(pm, "combine")
    names = list(weights)
    recs = [r for r, m in _containers(pm).items() if any(n in m.adapters for n in names)]
    pairs = {r: [(weights[n], *lora_factors(pm.get_submodule(r).adapters[n])) for n in names
                 if n in pm.get_submodule(r).adapters] for r in recs}
    with torch.no_grad():
        new = {r: (_cat(ps) if combination == "cat" else _linear(ps, r)) for r, ps in pairs.items()}
    R = max(a.shape[0] for a, _ in new.values())
    built = {}
    for r, (a, b) in new.items():
        multi = pm.get_submodule(r)
        site = pm.peft_info.adapters[r].site
        module = (LoRAEmbedding(a.shape[1], b.shape[0], R, 1.0, device=a.device, dtype=a.dtype) if multi.embedding
                  else LoRALinear(a.shape[1], b.shape[0], R, 1.0, 0.0, "kaiming", [(0, b.shape[0])],
                                  device=a.device, dtype=a.dtype))
        A, B = (module.lora_embedding_A, module.lora_embedding_B) if multi.embedding else (module.lora_A, module.lora_B)
        with torch.no_grad():
            A.zero_()
            B.zero_()
            A[: a.shape[0]] = a
            B[:, : b.shape[1]] = b
        built[r] = (site, module)
    sel = None
    for n in names:
        for rule in pm.peft_info.multi["adapters"][n]["rules"]:
            sel = rule.selector if sel is None else sel | rule.selector
    rule = LoRA(rank=R, alpha=float(R), targets=sel)
    for r, (_, module) in built.items():
        pm.get_submodule(r).adapters[name] = module
    pm.peft_info.multi["adapters"][name] = {"rules": [rule], "records": {r: 0 for r in built}}
    freeze_pass(pm)
    return pm


def _cat(ps: list) -> tuple[torch.Tensor, torch.Tensor]:
    """HF PEFT's "cat": A = [w₁s₁A₁; …; w_ks_kA_k], B = [B₁ … B_k] — B A = Σ wᵢ sᵢ Bᵢ Aᵢ."""
    return torch.cat([w * s * a for w, a, _, s in ps]), torch.cat([b for _, _, b, _ in ps], dim=1)


def _linear(ps: list, rec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """HF PEFT's "linear": A = Σ ±√|wᵢsᵢ| Aᵢ (sign of wᵢsᵢ), B = Σ √|wᵢsᵢ| Bᵢ (equal ranks)."""
    if len({a.shape[0] for _, a, _, _ in ps}) != 1:
        raise PeftfxError(f"combination='linear' needs equal ranks; at {rec} the ranks are "
                          f"{[a.shape[0] for _, a, _, _ in ps]}. Use combination='cat'.")
    a_out = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a for w, a, _, s in ps)
    b_out = sum(math.sqrt(abs(w * s)) * b for w, _, b, s in ps)
    return a_out, b_out


# -------------------------------------------------------------------------------------- mixed batch
def _row_index(pm: PeftModel, adapters: Any) -> torch.Tensor:
    names = adapter_names(pm)
    if isinstance(adapters, torch.Tensor):
        idx = adapters.to(torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= len(names)):
            raise PeftfxError(f"mixed batch indices must be -1 (base) or 0…{len(names) - 1} (adapters {names}); "
                              f"got {idx.tolist()}.")
        return idx
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise PeftfxError("mixed batch takes one adapter name (None = base) per row, e.g. ['a', None, 'b'], or a "
                          "tensor of indices into peftfx.adapter_names(model) with -1 for the base.")
    _known(pm, [a for a in adapters if a is not None])
    return torch.tensor([-1 if a is None else names.index(a) for a in adapters], dtype=torch.long)


@contextlib.contextmanager
def mixed_batch(pm: PeftModel, adapters: Any) -> Iterator[PeftModel]:
    """Within the block, row b of every forward uses adapter ``adapters[b]`` (a name, None for the base;
    or an index tensor, -1 for the base). One gathered batched matmul per site serves all rows."""
    require_peft(pm, "mixed_batch")
    idx = _row_index(pm, adapters)
    _check_unmerged(pm, "mixed_batch")
    names = adapter_names(pm)
    mods = _containers(pm).values()
    for m in mods:
        local = list(m.adapters)
        lut = torch.tensor([len(local)] + [local.index(n) if n in local else len(local) for n in names])
        m.rows = lut[idx + 1]
    try:
        yield pm
    finally:
        for m in mods:
            m.rows = None


def forward_mixed(pm: PeftModel, adapters: Any, *args: Any, **kwargs: Any) -> Any:
    """``pm(*args, **kwargs)`` with row b of the batch run through adapter ``adapters[b]``."""
    with mixed_batch(pm, adapters):
        return pm(*args, **kwargs)


# --------------------------------------------------------------------------------------- save view
def adapter_view(pm: PeftModel, name: str | None = None) -> PeftModel:
    """A small PeftModel holding only adapter ``name`` as a plain single-adapter model would (same records,
    rules, keys ``{site}.lora.lora_A``): what :func:`peftfx.save_adapter` writes for ``adapter=name``. It
    shares the adapter's parameters and has an empty graph (it is for saving, not for running)."""
    require_peft(pm, "adapter_view")
    names = adapter_names(pm)
    if name is None:
        if len(names) != 1:
            raise CheckpointError(f"this model holds named adapters {names}; pass adapter='…' to save_adapter "
                                  "to pick the one to save.")
        name = names[0]
    _known(pm, [name])
    entry = pm.peft_info.multi["adapters"][name]
    graph = fx.Graph()
    graph.output(None)
    view = PeftModel(nn.Module(), graph)
    info = pm.peft_info
    view.peft_info = PeftInfo(input_names=list(info.input_names), constants=dict(info.constants),
                              device=info.device, rules=list(entry["rules"]))
    for rec, rule_index in entry["records"].items():
        view.add_submodule(rec, pm.get_submodule(rec).adapters[name])
        old = info.adapters[rec]
        view.peft_info.adapters[rec] = AdapterRecord(name=rec, method="lora", rule_index=rule_index,
                                                     site=dict(old.site), node=old.node)
    return view


def is_multi(pm: Any) -> bool:
    return isinstance(pm, PeftModel) and bool(pm.peft_info.multi.get("adapters"))
