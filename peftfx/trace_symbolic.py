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

Modules: this one runs the steps; ``_symbolic_sizes`` (dynamic dimensions, groups, model constants, traced and
check sizes, size expressions), ``_symbolic_rewrite`` (integers → ``sym_size`` nodes, symbolic ``meta["val"]``,
predicted output shapes), ``_symbolic_probes`` (the eager checks and probes).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ._symbolic_probes import _behaviour, _probe_fixed, _probe_ties, _Refused
from ._symbolic_rewrite import _drop_guards, _predicted, _remark, _rewrite
from ._symbolic_sizes import (
    _check_sizes,
    _choose_sizes,
    _Fallback,
    _groups,
    _leaf_dims,
    _model_constants,
    _resized,
)

__all__ = ["clear_info", "info", "symbolic_export"]

log = logging.getLogger(__name__)

_STATS = {"symbolic": 0, "fallback": 0}


def info() -> dict[str, int]:
    """``{"symbolic": graphs made by the static-then-symbolic trace, "fallback": dynamic exports it fell back to}``."""
    return dict(_STATS)


def clear_info() -> None:
    _STATS.update(symbolic=0, fallback=0)


def enabled() -> bool:
    return os.environ.get("PEFTFX_SYMBOLIC_TRACE", "1") not in ("0", "false", "off", "")


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
