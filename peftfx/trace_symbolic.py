"""The static-then-symbolic trace: ``torch.export`` without dynamic shapes, then batch/sequence made symbolic again.

``torch.export`` with dynamic batch and sequence spends most of its time on symbolic-shape arithmetic; a static
export of the same model is 2–3× faster. :func:`symbolic_export` exports at sizes chosen so that each dynamic
size (the batch: a prime ≥ 17; each distinct sequence-like length, such as an encoder's and a decoder's, or a KV
cache's: near the example's, all shifted together, coprime to the batch) is a number > 16 that no model constant is
a multiple of (a non-batch dimension of a KV cache or of a floating-point input whose size *is* a model constant —
heads, head size, Whisper's mel bins — is taken as fixed, as torch.export finds), then rewrites every integer of the graph that is a product of
those sizes (``k · B^i · S^j``, k ≤ 16 or a model constant: view/reshape/expand shapes, ``arange``/``full``/``slice``
ends, …) into ``aten.sym_size.int`` nodes of the inputs and products of them — the graph the dynamic export would
have made, with the same calling convention (pytree in/out spec) and node metadata.

Soundness: any of these failing falls back to the dynamic export (one ``logging.info`` line saying why).
1. *Ambiguity*: a graph integer that matches two expressions cannot be attributed. (No model constant — a config
   integer, a parameter or buffer dimension — is a multiple of a traced size, by the choice of sizes.)
2. *Behaviour*: the model (eager) and the rewritten graph run on the inputs resized to a second batch and sequence
   (the example's rows and tokens repeated or cut; a KV cache copied, as the model updates it in place), with the
   same random seed (dropout draws alike; small sizes first, the example's own if the model refuses those), on one thread (a few tokens: one thread is 5–8× faster than two on a busy
   2-core machine); their outputs must agree: max |Δ| ≤ 1e-5 + 1e-4 · max |eager|. This catches a size left static
   (a constant tensor of the traced length, a float of it), a Python branch on a size (``if seq > 10``), an integer
   taken for a size that is not one. A model on ``meta`` (no values; transformers' mask code calls ``.item()``,
   which meta refuses) is held to the output shapes the rewrite implies at the second sizes: a branch that keeps
   the shapes is not seen there.
3. *Symbolic values*: every node's ``meta["val"]`` is rebuilt in one fake mode whose shape environment has a symbol
   per dynamic size, each traced size or stride that is a size expression replaced by that expression of the
   symbols — what the passes and the ONNX export read (``traced_axes``). A full symbolic fake-tensor propagation
   would cost about as much as the export it replaces (1 s of 1.4 s on a tiny Llama).

``PEFTFX_SYMBOLIC_TRACE=0`` turns it off (every dynamic trace is a dynamic ``torch.export``); :func:`info` counts
graphs taken and fallbacks.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import operator
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

__all__ = ["clear_info", "info", "symbolic_export"]

log = logging.getLogger(__name__)

#: candidate traced sizes: primes above the multipliers ``k ≤ 16`` allowed in an expression
_PRIMES = (17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101, 103, 107, 109, 113)
_SMALL_K = 16
_STATS = {"symbolic": 0, "fallback": 0}


def info() -> dict[str, int]:
    """``{"symbolic": graphs made by the static-then-symbolic trace, "fallback": dynamic exports it fell back to}``."""
    return dict(_STATS)


def clear_info() -> None:
    _STATS.update(symbolic=0, fallback=0)


def enabled() -> bool:
    return os.environ.get("PEFTFX_SYMBOLIC_TRACE", "1") not in ("0", "false", "off", "")


class _Fallback(Exception):
    """Why the static-then-symbolic graph is not used (logged, then the dynamic export runs)."""


def symbolic_export(model: nn.Module, kwargs: dict[str, Any], spec: dict[str, Any],
                    dynamic_export: Callable[[], fx.GraphModule]) -> fx.GraphModule:
    """The unlifted graph of ``model`` on ``kwargs``, symbolic in the dimensions ``spec`` (``dynamic_shapes`` as
    :func:`peftfx.trace._dynamic_shapes` makes it, not nested under ``**kwargs``) marks dynamic: static export +
    rewrite when every check passes, else ``dynamic_export()``."""
    if not enabled():
        return dynamic_export()
    try:
        gm = _static_then_symbolic(model, kwargs, spec)
    except _Fallback as e:
        return _fallback(model, str(e), dynamic_export)
    except Exception:  # anything unforeseen: the dynamic export stays the reference path (traceback logged)
        log.info("static-then-symbolic trace of %s failed unexpectedly", type(model).__name__, exc_info=True)
        return _fallback(model, "an unexpected error", dynamic_export)
    _STATS["symbolic"] += 1
    return gm


def _fallback(model: nn.Module, why: str, dynamic_export: Callable[[], fx.GraphModule]) -> fx.GraphModule:
    _STATS["fallback"] += 1
    log.info("static-then-symbolic trace of %s not used (%s); tracing with dynamic shapes", type(model).__name__, why)
    return dynamic_export()


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


# ---------------------------------------------------------------------------------------------- the rewrite
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


def _rewrite(gm: fx.GraphModule, sizes, groups, leaves, consts) -> int:
    """Replace every integer argument that is a size expression by ``sym_size`` nodes; returns how many."""
    graph = gm.graph
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(holders) != len(leaves):
        raise _Fallback(f"{len(holders)} graph inputs for {len(leaves)} input leaves")
    monomials, ks = _expressions(sizes, consts)
    cursor = holders[-1] if holders else next(iter(graph.nodes))
    made: dict[Any, fx.Node] = {}

    def insert(target, args):
        nonlocal cursor
        with graph.inserting_after(cursor):
            cursor = graph.call_function(target, args)
        return cursor

    def node_for(k, mono):
        key = (k, mono)
        if key in made:
            return made[key]
        factors = []
        for g, p in mono:
            if (g, 1) not in made:
                i, d = groups[g][0]
                made[(g, 1)] = insert(torch.ops.aten.sym_size.int, (holders[i], d))
            factors += [made[(g, 1)]] * p
        out = factors[0]
        for f in factors[1:]:
            out = insert(operator.mul, (out, f))
        if k != 1:
            out = insert(operator.mul, (k, out))
        made[key] = out
        return out

    count = 0

    def sub(a):
        nonlocal count
        if type(a) is int:
            hit = _classify(a, monomials, ks, consts)
            if hit is not None:
                count += 1
                return node_for(1, hit[1]) if hit[0] == 1 else node_for(*hit)
        return a

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is torch.ops.aten.sym_size.int or node in made.values():
            continue
        node.args = fx.node.map_aggregate(node.args, sub)
        node.kwargs = fx.node.map_aggregate(node.kwargs, sub)
    return count


def _drop_guards(gm: fx.GraphModule) -> None:
    """torch.export's input guards of the static shapes (``_guards_fn``) go; the cleanup pass would drop them too."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


# ------------------------------------------------------------------------------------------------ the checks
def _remark(gm: fx.GraphModule, leaves, groups, sizes, consts) -> None:
    """Every node's ``meta["val"]`` made symbolic, as the dynamic export would give it: one fake mode whose shape
    environment holds a symbol per group (the inputs' dynamic sizes); each size or stride of a static value that is
    a size expression becomes that expression of the symbols. (A full fake-tensor propagation of the graph would
    cost as much as the export it replaces.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    dyn: dict[int, set[int]] = {}
    for occ in groups.values():
        for i, d in occ:
            dyn.setdefault(i, set()).add(d)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    syms: dict[Any, Any] = {}
    for i, (v, _) in enumerate(leaves):
        if isinstance(v, torch.Tensor):
            ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DUCK if d in dyn.get(i, ()) else
                                                          DimDynamic.STATIC for d in range(v.dim())])
            holders[i].meta["val"] = fake = mode.from_tensor(v, symbolic_context=ctx)
            for g, occ in groups.items():
                for j, d in occ:
                    if j == i:
                        syms.setdefault(g, fake.shape[d])
    if any(not isinstance(syms.get(g), torch.SymInt) for g in groups):
        raise _Fallback("the traced sizes did not become one symbol per dynamic size")
    monomials, ks = _expressions(sizes, consts)
    memo: dict[int, Any] = {}

    def sym(c: int) -> Any:
        if c not in memo:
            hit = _classify(c, monomials, ks, consts) if c > _SMALL_K else None
            out: Any = c
            if hit is not None:
                out = hit[0]
                for g, p in hit[1]:
                    for _ in range(p):
                        out = out * syms[g]
            memo[c] = out
        return memo[c]

    made: dict[tuple, torch.Tensor] = {}

    def remake(v: Any) -> Any:
        if isinstance(v, torch.Tensor):     # one fake value per (shape, stride, dtype, device): 32 layers share
            key = (tuple(v.shape), v.stride(), v.dtype, v.device, v.requires_grad)
            if key not in made:
                with mode:
                    made[key] = torch.empty_strided([sym(int(d)) for d in v.shape],
                                                    [sym(int(d)) for d in v.stride()], dtype=v.dtype,
                                                    device=v.device, requires_grad=v.requires_grad)
            return made[key]
        if isinstance(v, (list, tuple)):
            return type(v)(remake(x) for x in v)
        return v

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int:
            node.meta["val"] = syms[next(g for g, occ in groups.items()
                                         if (holders.index(node.args[0]), node.args[1]) in occ)]
        elif node.op == "call_function" and node.target is operator.mul and node.meta.get("val") is None:
            a, b = (x.meta["val"] if isinstance(x, fx.Node) else x for x in node.args)
            node.meta["val"] = a * b
        elif "val" in node.meta:
            try:
                node.meta["val"] = remake(node.meta["val"])
            except Exception as e:   # a value the fake mode cannot rebuild (a sparse or quantized tensor)
                raise _Fallback(f"node {node.name}'s value could not be made symbolic ({type(e).__name__})") from e


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


def _predicted(gm: fx.GraphModule, sizes, check, consts) -> list[tuple]:
    """The shapes of the graph's tensor outputs at the ``check`` sizes, as the rewrite reads the traced ones."""
    monomials, ks = _expressions(sizes, consts)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    shapes = []
    for node in pytree.tree_leaves(out.args):
        v = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(v, torch.Tensor):
            continue
        dims = []
        for d in v.shape:
            hit = _classify(int(d), monomials, ks, consts) if int(d) > _SMALL_K else None
            if hit is not None:
                d = hit[0]
                for g, p in hit[1]:
                    d *= check[g] ** p
            dims.append(int(d))
        shapes.append(tuple(dims))
    return shapes


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


class _Refused(_Fallback):
    """The eager model does not run at these check sizes."""


def _static_then_symbolic(model: nn.Module, kwargs: dict[str, Any], spec: dict[str, Any]) -> fx.GraphModule:
    consts = _model_constants(model)
    assumed: list[tuple[int, int]] = []
    leaves = _leaf_dims(kwargs, spec, consts, assumed)
    groups = _groups(leaves)
    if not groups:
        raise _Fallback("no dynamic dimension")
    _probe_ties(model, kwargs, leaves, groups)
    sizes = _choose_sizes(groups, consts)
    traced = _resized(kwargs, leaves, groups, sizes)
    try:
        ep = torch.export.export(model, (), kwargs=traced, strict=False)
    except Exception as e:  # torch.export raises many types; the dynamic export reports its own error
        raise _Fallback(f"static export at the chosen sizes failed: {type(e).__name__}") from e
    unlifted = ep.module()
    _drop_guards(unlifted)
    checks = _check_sizes(groups, sizes)
    _rewrite(unlifted, sizes, groups, leaves, consts)
    unlifted.graph.lint()
    gm = fx.GraphModule(unlifted, unlifted.graph)  # recompiled; no input-constraint hook of the static shapes
    for i, check in enumerate(checks):
        try:
            _behaviour(model, gm, _resized(kwargs, leaves, groups, check), _predicted(gm, sizes, check, consts))
            break
        except _Refused:
            if i == len(checks) - 1:
                raise
    _probe_fixed(model, _resized(kwargs, leaves, groups, check), assumed)
    _remark(gm, _leaf_dims(traced, spec, consts), groups, sizes, consts)
    return gm
