"""The sizes of the static-then-symbolic trace (:mod:`peftfx.trace_symbolic`): which input dimensions are dynamic
and how the example ties them (one group per symbol), the model's own integers, the traced and check sizes chosen
so that no model constant is a multiple of them, inputs resized to them, and which graph integers are size
expressions (``k · Π size^power``)."""
from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

#: candidate traced sizes: primes above the multipliers ``k ≤ 16`` allowed in an expression
_PRIMES = (17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101, 103, 107, 109, 113)
_SMALL_K = 16


class _Fallback(Exception):
    """Why the static-then-symbolic graph is not used (logged, then the dynamic export runs)."""


# ----------------------------------------------------------------------------------------------- the inputs
def _leaf_dims(kwargs: dict[str, Any], spec: dict[str, Any], consts: set[int],
               assumed: list[tuple[int, int]] | None = None) -> list[tuple[Any, set[int]]]:
    """(leaf, dynamic dims) for every pytree leaf of ``((), kwargs)``, in flatten order. Inside a registered
    container (a KV cache) ``spec`` marks every dimension; one whose size is a model constant (heads, head size)
    is taken as fixed by the model, as torch.export would find. Those (leaf index, dim) go into ``assumed``:
    :func:`_probe_fixed` then proves the model does fix them (a cache length that happens to equal a model
    constant is not fixed, and sends the trace to the dynamic export)."""
    out: list[tuple[Any, set[int]]] = []

    def walk(v, s, inner):
        if isinstance(v, torch.Tensor):
            dims = set(s) if isinstance(s, dict) else set()
            fixed = inner or v.is_floating_point()      # features: Whisper's (batch, mel bins, frames)
            keep = {d for d in dims if d == 0 or not fixed or int(v.shape[d]) not in consts}
            if assumed is not None:
                assumed.extend((len(out), d) for d in sorted(dims - keep))
            out.append((v, keep))
        elif isinstance(v, (list, tuple)) and type(v) in (list, tuple):
            for i, x in enumerate(v):
                walk(x, s[i] if isinstance(s, (list, tuple)) and i < len(s) else None, inner)
        elif isinstance(v, dict) and type(v) is dict:
            for k, x in v.items():
                walk(x, s.get(k) if isinstance(s, dict) else None, inner)
        elif type(v) in pytree.SUPPORTED_NODES:
            children = pytree.SUPPORTED_NODES[type(v)].flatten_fn(v)[0]
            for i, x in enumerate(children):
                walk(x, s[i] if isinstance(s, (list, tuple)) and i < len(s) else None, True)
        else:
            out.append((v, set()))

    for name, v in kwargs.items():
        walk(v, spec.get(name), False)
    leaves = pytree.tree_leaves(((), kwargs))
    if len(leaves) != len(out) or any(a is not b for a, (b, _) in zip(leaves, out)):
        raise _Fallback("the inputs' pytree leaves could not be matched to their dynamic dimensions")
    return out


def _groups(leaves: list[tuple[Any, set[int]]]) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """Dynamic sizes grouped as the example ties them: ``("batch", size)`` for dimension 0, ``("seq", size)`` for
    the others; each group → its (leaf index, dim) occurrences. One group becomes one symbol."""
    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for i, (t, dims) in enumerate(leaves):
        for d in sorted(dims):
            groups.setdefault(("batch" if d == 0 else "seq", int(t.shape[d])), []).append((i, d))
    return groups


def _model_constants(model: nn.Module) -> set[int]:
    """Every integer ≥ 2 the model is known to hold: config values (nested) and parameter/buffer dimensions."""
    found: set[int] = set()

    def walk(v, depth=0):
        if isinstance(v, bool) or depth > 4:
            return
        if isinstance(v, int):
            found.add(abs(v))
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, depth + 1)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x, depth + 1)

    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        try:
            data = to_dict()
        except (TypeError, ValueError, AttributeError) as e:   # a config that cannot describe itself
            log.debug("config of %s gives no constants: %s", type(model).__name__, e)
        else:
            walk(data)
    for t in itertools.chain(model.parameters(), model.buffers()):
        found.update(int(d) for d in t.shape)
    return {c for c in found if c >= 2}


def _choose_sizes(groups, consts: set[int]) -> dict[tuple[str, int], int]:
    """Traced size per group: batch groups distinct primes, sequence groups shifted together (sizes that differ by
    a constant in the example, such as a mask one longer than the cache, still do); no model constant is a
    multiple of any of them, none equal another."""
    def clean(n: int, taken: set[int]) -> bool:
        return n > _SMALL_K and n not in taken and not any(c % n == 0 for c in consts)

    sizes: dict[tuple[str, int], int] = {}
    taken: set[int] = set()
    for g in sorted(g for g in groups if g[0] == "batch"):
        n = next((p for p in _PRIMES if clean(p, taken)), None)
        if n is None:
            raise _Fallback("no batch size to trace at that is not a divisor of a model constant")
        sizes[g] = n
        taken.add(n)
    seq = sorted(g for g in groups if g[0] == "seq")
    if seq:     # near the example's lengths (a convolution over audio needs its length), coprime to the batch
        base = max(seq[0][1], _SMALL_K + 1)
        for p in itertools.chain.from_iterable((base + i, base - i) for i in range(256)):
            vals = [p + (g[1] - seq[0][1]) for g in seq]
            if all(clean(v, taken) and all(math.gcd(v, b) == 1 for b in taken) for v in vals) \
                    and len(set(vals)) == len(vals):
                sizes.update(zip(seq, vals))
                break
        else:
            raise _Fallback("no sequence length to trace at that is not a divisor of a model constant")
    return sizes


def _check_sizes(groups, sizes) -> list[dict[Any, int]]:
    """Sizes to check at, each different from its traced one, the sequence groups' differences kept: small ones
    first (cheap), then the example's own (a model that needs long inputs, such as audio through convolutions)."""
    small, own = {}, {}
    seq = sorted(g for g in groups if g[0] == "seq")
    same = any(sizes[g] == g[1] for g in seq)
    for g in groups:
        if g[0] == "batch":
            small[g] = 3
            own[g] = g[1] if g[1] != sizes[g] else g[1] + 1
        else:
            small[g] = g[1] + (5 - seq[0][1] if seq[0][1] != 5 else 1)
            own[g] = g[1] - 1 if same else g[1]
    return [small, own]


def _resize(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``t`` with ``n`` entries along ``dim``: its own entries repeated (or cut)."""
    have = t.shape[dim]
    if n > have:
        reps = [1] * t.dim()
        reps[dim] = -(-n // have)
        t = t.repeat(*reps)
    return t.narrow(dim, 0, n).contiguous()


def _resized(kwargs, leaves, groups, sizes) -> dict[str, Any]:
    new_leaves = [v for v, _ in leaves]
    for g, occ in groups.items():
        for i, d in occ:
            new_leaves[i] = _resize(new_leaves[i], d, sizes[g])
    _, spec = pytree.tree_flatten(((), kwargs))
    return pytree.tree_unflatten(new_leaves, spec)[1]


# ------------------------------------------------------------------------------------ size expressions
def _expressions(sizes: dict[Any, int], consts: set[int]):
    """value → [(k, ((group, power), …))] for every ``k · Π size^power`` (degree 1–3) a graph integer may be."""
    groups = list(sizes)
    monomials = []
    for powers in itertools.product(range(3), repeat=len(groups)):
        deg = sum(powers)
        if 1 <= deg <= 3:
            value = 1
            for g, p in zip(groups, powers):
                value *= sizes[g] ** p
            monomials.append((value, tuple((g, p) for g, p in zip(groups, powers) if p)))
    return monomials, set(range(1, _SMALL_K + 1)) | consts


def _classify(c: int, monomials, ks, consts) -> tuple | None:
    hits = [(c // v, mono) for v, mono in monomials if c % v == 0 and c // v in ks]
    if not hits:
        return None
    if len(hits) > 1 or c in consts:
        raise _Fallback(f"the graph integer {c} is ambiguous ({len(hits)} size expressions"
                        f"{', and a model constant' if c in consts else ''})")
    return hits[0]
