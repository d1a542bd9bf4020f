"""Modules to save — Hugging Face PEFT's ``modules_to_save``: a trainable copy of whole modules (a new
classification head, an LM head) used in place of the original, which is kept frozen.

    y = op(x, W_c, b_c)     W_c, b_c: copies of the module's W₀, b₀ (init equal: the copy is the identity change)

``op`` is the site's own operation (``linear``, GPT-2's transposed ``addmm``, ``embedding``, a convolution with
the site's stride/padding/dilation/groups), so each weight-matmul site inside a named module gets one copy of its
weight (and bias): ``weight`` and ``bias`` parameters, out·in + out values per linear (HF PEFT's count: the copy's
parameters are all trainable). A module is named as in HF PEFT (``modules_to_save=["classifier"]``): a module whose
path is the name or ends with ``.name``; every site inside it (``classifier.dense``, ``classifier.out_proj``) takes a
copy. A named module with parameters that no weight-matmul site reads (a LayerNorm inside the head) is an error:
those would stay frozen and shared, which is not a copy of the module.

Merging writes the copy into the base weight (HF's ``merge_and_unload`` keeps the trained copy); unmerging puts the
original back. ``disable_adapter`` runs the original module. Checkpoints hold the copy; in a Hugging Face folder under
the module's own parameter names (``base_model.model.score.weight``) with the names in the config's
``modules_to_save``, as HF PEFT writes them.

Use it as a rule of its own, ``ModulesToSave(names=("classifier",))``, or as an option of any rule,
``LoRA(rank=8, modules_to_save=["classifier"])`` (the rule is split in two when rules are read).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import RuleError
from ..rules import Selector, select
from ..sites import canonical_weight
from .base import AdapterModule, MethodConfig, register_method

__all__ = ["ModuleCopy", "ModulesToSave", "module_selector"]

_SITE_OPS = {"linear", "addmm", "mm", "matmul", "embedding", "conv1d", "conv2d", "conv3d", "convolution", "t",
             "transpose", "permute"}


def module_selector(names: tuple[str, ...]) -> Selector:
    """Sites inside a module named ``name`` (its path is ``name`` or ends with ``.name``), for each name."""
    alts = "|".join(re.escape(n) for n in names)
    return select.regex(rf"(?:.*\.)?(?:{alts})(?:\..*)?")


@register_method
@dataclass(frozen=True)
class ModulesToSave(MethodConfig):
    """``names``: module names as in HF PEFT's ``modules_to_save`` (``"classifier"``, ``"score"``, ``"lm_head"``)."""

    names: tuple[str, ...] = ()
    targets: Selector | None = None

    name: ClassVar[str] = "modules_to_save"
    aliases: ClassVar[tuple[str, ...]] = ("mts",)
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "linear_t", "embedding", "conv"})

    def validate(self) -> None:
        if not self.names or any(not n or not isinstance(n, str) for n in self.names):
            raise RuleError(f"ModulesToSave names must be a non-empty list of module names, got {list(self.names)!r}")
        if self.modules_to_save or self.trainable_token_indices:
            raise RuleError("ModulesToSave takes names=..., not modules_to_save/trainable_token_indices")

    def default_targets(self) -> Selector:
        return module_selector(self.names)

    @classmethod
    def conformance_example(cls) -> ModulesToSave:
        """The config ``tests/test_conformance.py`` applies (the default has no names): a causal LM's head."""
        return cls(names=("lm_head",))

    def owner(self, path: str) -> str:
        """The named module a site path lies in (the longest prefix of ``path`` that matches a name)."""
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if any(prefix == n or prefix.endswith("." + n) for n in self.names):
                return prefix
        return path

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> ModuleCopy:
        gm = site.node.graph.owning_module
        if gm is not None:
            _check_covered(gm, self.owner(site.path))
        bias = gm.get_parameter(site.bias) if gm is not None and site.bias else None
        return ModuleCopy(site, weight, bias)


def _check_covered(gm: nn.Module, owner: str) -> None:
    """Every parameter of module ``owner`` is read by weight-matmul sites only (each then gets its copy)."""
    try:
        module = gm.get_submodule(owner)
    except AttributeError:
        return
    params = {id(p): f"{owner}.{n}" for n, p in module.named_parameters()}
    bad = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            t = gm.get_parameter(node.target)
        except AttributeError:
            continue
        if id(t) not in params:
            continue
        for user in node.users:
            op = getattr(user.target, "__name__", str(user.target)).split(".")[0]
            if user.op != "call_function" or op not in _SITE_OPS:
                bad.add(params[id(t)])
    if bad:
        raise RuleError(f"modules_to_save: module {owner!r} has parameter(s) {sorted(bad)} that no weight-matmul "
                        "site reads (a norm, a bare parameter); peftfx copies the weights of linear, embedding and "
                        "convolution sites only. Name the linear submodules instead (e.g. the head's last Linear).")


class ModuleCopy(AdapterModule):
    """A trainable copy of one site's weight (and bias); the site's output is recomputed with the copy."""

    position: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = True

    def __init__(self, site, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.kind, self.op = site.kind, site.op
        self.conv = None if site.conv is None else site.conv.describe()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.kind == "embedding":
            out = F.embedding(x, w)
        elif self.kind == "linear_t":
            out = F.linear(x, w.t(), b)
        elif self.kind == "conv":
            c = self.conv
            conv = (F.conv1d, F.conv2d, F.conv3d)[c["dims"] - 1]
            out = conv(x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"])
        else:
            out = F.linear(x, w, b)
        return out.to(y.dtype)

    @torch.no_grad()
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.__dict__["_originals"] = (weight.clone(), None if bias is None else bias.clone())
        weight.copy_(canonical_weight(self.weight, self.kind))
        if bias is not None and self.bias is not None:
            bias.copy_(self.bias)

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        saved = self.__dict__.pop("_originals", None)
        if saved is None:
            raise RuleError("modules_to_save: this copy was not merged here, so the original weight is unknown; "
                            "unmerge the model merge() returned.")
        weight.copy_(saved[0])
        if bias is not None and saved[1] is not None:
            bias.copy_(saved[1])
