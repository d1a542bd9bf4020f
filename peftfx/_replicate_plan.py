"""Planning the replicated trace (:mod:`peftfx.trace_replicate`): which block lists to cut, the kind of each block
(module tree, tensors, hooks, plain attributes, per-layer config entries), the shortest prefix holding every
consecutive pair of kinds, and the shallow view of the model cut to those prefixes (layer counts set to match)."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

_PRIMITIVE = (type(None), bool, int, float, str, torch.dtype)


class _Unsound(Exception):
    """The shallow trace cannot be replicated soundly (the message says why)."""


class _List:
    """One block list of the model: its path, blocks, kind per block and the length of the traced prefix."""

    def __init__(self, path: str, module: nn.ModuleList, kinds: list[int], keep: int):
        self.path, self.module, self.kinds, self.keep = path, module, kinds, keep

    def source(self, j: int) -> int:
        """The prefix block copied for block ``j``: of ``j``'s kind, after a block of ``j - 1``'s kind."""
        k = self.kinds
        return max(a for a in range(1, self.keep) if k[a] == k[j] and k[a - 1] == k[j - 1])


def _plan(model: nn.Module, kwargs: dict[str, Any]) -> tuple[list[_List], str]:
    """The block lists to cut, and why the whole model must be traced instead ("" when it need not)."""
    config = getattr(model, "config", None)
    lists: list[_List] = []
    taken: list[str] = []
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or any(path.startswith(t + ".") for t in taken):
            continue
        taken.append(path)                  # only outermost lists; a list inside a block is part of the block
        if len(mod) < 3:
            continue
        kinds = _kinds(mod, config)
        keep = _prefix(kinds)
        if keep is not None and keep < len(mod):
            lists.append(_List(path, mod, kinds, keep))
    if not lists:
        return [], "no list of 3 or more blocks longer than the prefix that holds each kind"
    for name, v in kwargs.items():
        if not isinstance(v, torch.Tensor) and type(v) in pytree.SUPPORTED_NODES and type(v) not in (list, tuple, dict):
            return lists, f"input {name!r} is a container (a key-value cache holds one entry per layer)"
    for flag in ("use_cache", "output_hidden_states", "output_attentions"):
        default = getattr(config, flag, False) if flag != "use_cache" else False
        if kwargs.get(flag, default) is True:
            return lists, f"{flag}=True returns one entry per layer"
    return lists, ""


def _kinds(blocks: nn.ModuleList, config: Any) -> list[int]:
    n = len(blocks)
    per_layer = [v for k, v in sorted(_fields(config).items()) if isinstance(v, (list, tuple)) and len(v) == n] \
        if config is not None else []
    raw = [_describe(b) for b in blocks]
    # an integer attribute equal to the block's own index in every block (layer_idx) is "the index", not a difference
    index = {key for key in raw[0][1] if all(isinstance(r[1].get(key), int) and not isinstance(r[1].get(key), bool)
                                             and r[1][key] == i for i, r in enumerate(raw))}
    seen: dict[str, int] = {}
    kinds = []
    for i, (mods, attrs, tensors) in enumerate(raw):
        values = sorted((key, "<block index>" if key in index else v) for key, v in attrs.items())
        sig = repr((mods, values, tensors, [repr(v[i]) for v in per_layer]))
        kinds.append(seen.setdefault(sig, len(seen)))
    return kinds


def _describe(block: nn.Module) -> tuple[list, dict, list]:
    """(module tree with hooks, plain attributes by (module, name), tensors) of one block."""
    mods, attrs = [], {}
    for name, m in block.named_modules():
        hooks = [id(h) for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()]
        mods.append((name, type(m).__module__ + "." + type(m).__qualname__, m.training, hooks))
        attrs.update({(name, k): _attr(v) for k, v in vars(m).items() if not k.startswith("_")})
    tensors = [(n, tuple(t.shape), str(t.dtype), t.device.type, isinstance(t, nn.Parameter), t.requires_grad)
               for n, t in list(block.named_parameters(remove_duplicate=False))
               + list(block.named_buffers(remove_duplicate=False))]
    return mods, attrs, tensors


def _attr(v: Any) -> Any:
    if isinstance(v, _PRIMITIVE):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, _PRIMITIVE) for x in v):
        return tuple(v)
    if callable(v) and hasattr(v, "__qualname__"):
        return getattr(v, "__module__", "") + "." + v.__qualname__
    return type(v).__qualname__             # an object (the shared config): its type


def _prefix(kinds: list[int]) -> int | None:
    """The shortest prefix (≥ 2) holding every pair (kind of j-1, kind of j) of the list and ending in a block of
    the last block's kind (the code after the list reads the last block's outputs)."""
    pairs = {(kinds[j - 1], kinds[j]) for j in range(1, len(kinds))}
    have: set[tuple[int, int]] = set()
    for a in range(1, len(kinds)):
        have.add((kinds[a - 1], kinds[a]))
        if have >= pairs and kinds[a] == kinds[-1]:
            return a + 1
    return None


@contextlib.contextmanager
def _shallow(model: nn.Module, lists: list[_List]) -> Iterator[None]:
    """Every list cut to its prefix (the same block modules), and every layer count that equals a cut list's length
    (:func:`_counters`) set to its prefix's, all restored on exit. Code that counts layers through the config
    (``i == config.num_hidden_layers - 1``) then sees the prefix's last block as the last, so a last block traced
    differently shows as a difference between blocks of one kind instead of a silent copy of a middle block."""
    saved = [(lst.module, lst.module.__dict__["_modules"]) for lst in lists]
    config = getattr(model, "config", None)
    counters = _counters(model, lists)
    done: list[tuple[Any, str, int]] = []
    try:
        for obj, name, value, keep in counters:
            _put(obj, name, keep)
            done.append((obj, name, value))
        for lst in lists:
            items = list(lst.module.__dict__["_modules"].items())[: lst.keep]
            lst.module.__dict__["_modules"] = OrderedDict(items)
        yield
    finally:
        for mod, modules in saved:
            mod.__dict__["_modules"] = modules
        if config is not None and getattr(model, "config", None) is not config:
            model.config = config   # non-strict torch.export leaves a copy of a dict attribute (the cut count) there
        for obj, name, value in done:
            _put(obj, name, value)


def _counters(model: nn.Module, lists: list[_List]) -> list[tuple[Any, str, int, int]]:
    """(object, attribute, value, prefix length) for every integer attribute named like a layer count
    (``num_hidden_layers``, ``n_layer``, ``num_decoder_layers``) of the config (an item, for a config held as a
    dict) or of a module outside the lists that equals a cut list's length; one whose length two lists share with
    different prefixes is an error."""
    keeps: dict[int, set[int]] = {}
    for lst in lists:
        keeps.setdefault(len(lst.module), set()).add(lst.keep)
    inside = tuple(lst.path + "." for lst in lists)
    owners = [getattr(model, "config", None)] + [m for p, m in model.named_modules() if not (p + ".").startswith(inside)]
    out, seen = [], set()
    for obj in owners:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        for name, value in _fields(obj).items():
            if "layer" not in name.lower() or name.startswith("_") or type(value) is not int or value not in keeps:
                continue
            if len(keeps[value]) > 1:
                raise _Unsound(f"{name}={value} counts two lists cut to different prefixes")
            out.append((obj, name, value, next(iter(keeps[value]))))
    return out


def _fields(obj: Any) -> dict[str, Any]:
    """``obj``'s attributes or, for a config held as a mapping (a plain dict has no attributes), its string-keyed
    items."""
    if isinstance(obj, Mapping):
        return {k: v for k, v in obj.items() if isinstance(k, str)}
    return dict(getattr(obj, "__dict__", {}))


def _put(obj: Any, name: str, value: Any) -> None:
    """Set what :func:`_fields` read: an item of a mapping, else an attribute."""
    if isinstance(obj, Mapping):
        obj[name] = value
    else:
        setattr(obj, name, value)
