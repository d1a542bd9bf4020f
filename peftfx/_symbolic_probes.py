"""The eager checks of the static-then-symbolic trace (:mod:`peftfx.trace_symbolic`): the model and the rewritten
graph agree at other sizes (:func:`_behaviour`), lengths the example shares are tied by the model
(:func:`_probe_ties`), dimensions kept static because their size is a model constant are fixed by it
(:func:`_probe_fixed`); every eager run isolated (:func:`_isolated`: one thread, no autograd, RNG and buffers
restored). A model on ``meta`` (:func:`_on_meta`) cannot be probed."""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ._symbolic_sizes import _Fallback, _resize

log = logging.getLogger(__name__)


class _Refused(_Fallback):
    """The eager model does not run at these check sizes."""


def _on_meta(model: nn.Module) -> bool:
    """Whether ``model`` holds tensors on ``meta`` (it cannot run eagerly there)."""
    return any(t.device.type == "meta" for t in itertools.chain(model.parameters(), model.buffers()))


def _outputs(out: Any) -> list:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _behaviour(model: nn.Module, gm: fx.GraphModule, inputs: dict[str, Any], predicted: list[tuple]) -> None:
    """Eager ``model`` and ``gm`` on ``inputs`` (same seed) agree. A model on ``meta`` that cannot run eagerly
    there (transformers' mask code calls ``.item()``) is held to ``predicted``: the output shapes the rewrite
    implies at these sizes."""
    on_meta = _on_meta(model)
    with _isolated(model):
        torch.manual_seed(0)
        try:
            want: list | None = _outputs(model(**copy.deepcopy(inputs)))  # a KV cache input is updated in place
        except Exception as e:  # the model itself refuses the second shape: nothing to check against
            if not on_meta:
                raise _Refused(f"the model does not run at the check sizes: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e
            want = None
        torch.manual_seed(0)
        try:
            got = _outputs(gm(**copy.deepcopy(inputs)))
        except Exception as e:
            raise _Fallback(f"the rewritten graph fails at the check sizes: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e
    if want is None:
        shapes = [tuple(t.shape) for t in got]
        if shapes != predicted:
            raise _Fallback(f"output shapes {shapes} at the check sizes, the rewrite implies {predicted}")
        return
    if len(got) != len(want):
        raise _Fallback(f"{len(got)} outputs at the check sizes, the model gives {len(want)}")
    for a, b in zip(got, want):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise _Fallback(f"output {tuple(a.shape)} {a.dtype} at the check sizes, the model gives "
                            f"{tuple(b.shape)} {b.dtype}")
        if a.device.type == "meta" or b.device.type == "meta":
            continue
        if a.is_floating_point():      # max |a - b| ≤ 1e-5 + 1e-4 · max |b| (a NaN anywhere fails)
            ok = bool((a - b).abs_().max() <= 1e-5 + 1e-4 * b.abs().max()) if a.numel() else True
        else:
            ok = torch.equal(a, b)
        if not ok:
            raise _Fallback("the rewritten graph's output differs from the model's at the check sizes")


def _sources(kwargs: dict[str, Any]) -> list[tuple]:
    """Per pytree leaf of ``((), kwargs)`` (flatten order), where it comes from: the input's name, and inside a
    registered container its first-level child (an encoder-decoder cache's self- and cross-attention parts)."""
    paths = pytree.tree_flatten_with_path(((), kwargs))[0]
    out = []
    for path, _ in paths:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path[1:]]
        out.append(tuple(keys[:2]))
    return out


_MAX_TIE_PROBES = 15


def _probe_ties(model: nn.Module, kwargs: dict[str, Any], leaves, groups) -> None:
    """Sizes the example shares are one symbol only if the model ties them. A sequence group read by several
    inputs (input ids and mask; source and target of an encoder-decoder; a cache's self-attention part and the
    encoder length) is probed: for each proper subset of its sources holding the first, those sizes one larger,
    the rest as they are; the eager model must refuse every one. One it accepts is two lengths that only happen
    to be equal in the example (BART's source and target of 8): the dynamic export keeps them apart."""
    on_meta = _on_meta(model)
    src = _sources(kwargs)
    flat, spec = pytree.tree_flatten(((), kwargs))
    for g, occ in groups.items():
        if g[0] != "seq":
            continue
        names = sorted({src[i] for i, _ in occ})
        if len(names) < 2:
            continue
        if on_meta:
            raise _Fallback(f"sizes of {len(names)} inputs are equal in the example and cannot be probed on meta")
        subsets = [c for r in range(1, len(names)) for c in itertools.combinations(names[1:], r - 1)]
        if len(subsets) > _MAX_TIE_PROBES:
            raise _Fallback(f"{len(names)} inputs share a length in the example: too many to probe")
        for rest in subsets:
            chosen = {names[0], *rest}
            new = list(flat)
            for i, d in occ:
                if src[i] in chosen:
                    new[i] = _resize(new[i], d, g[1] + 1)
            probe = pytree.tree_unflatten(new, spec)[1]
            if _runs(model, probe):
                raise _Fallback(f"lengths of {sorted(chosen)} and of {sorted(set(names) - chosen)} are equal in the "
                                "example only (the model runs with them different)")


@contextlib.contextmanager
def _isolated(model: nn.Module) -> Iterator[None]:
    """Eager runs that leave no trace: one thread (a few tokens: 5-8x faster than two on a busy 2-core machine),
    no autograd, the RNG state and the model's buffers (BatchNorm statistics) restored after."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _runs(model: nn.Module, inputs: dict[str, Any]) -> bool:
    """Whether the eager model runs on ``inputs`` (see :func:`_isolated`)."""
    try:
        with _isolated(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**copy.deepcopy(inputs))
        return True
    except Exception as e:  # noqa: BLE001 - any refusal is the answer
        log.debug("probe refused: %s", type(e).__name__)
        return False


def _probe_fixed(model: nn.Module, inputs: dict[str, Any], assumed: list[tuple[int, int]]) -> None:
    """Every dimension :func:`_leaf_dims` kept static because its size equals a model constant must be one the
    model fixes: one class at a time (same dim, same size: a cache's heads in every layer), those sizes one larger
    at the check sizes, and the eager model must refuse them. A class the model accepts (a KV cache whose length
    happens to equal the number of layers) is a dynamic size the graph would have pinned: fall back. A model on
    ``meta`` cannot be probed (it does not run eagerly there): any such dimension falls back."""
    if not assumed:
        return
    if _on_meta(model):
        raise _Fallback("a dimension kept static because its size equals a model constant cannot be probed on meta")
    flat, spec = pytree.tree_flatten(((), inputs))
    classes: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, d in assumed:
        classes.setdefault((d, int(flat[i].shape[d])), []).append((i, d))
    for (d, n), occ in classes.items():
        leaves = list(flat)
        for i, _ in occ:
            leaves[i] = _resize(leaves[i], d, n + 1)
        if _runs(model, pytree.tree_unflatten(leaves, spec)[1]):
            raise _Fallback(f"dimension {d} of size {n} (a model constant) is not fixed by the model: it also runs "
                            f"with {n + 1}")
