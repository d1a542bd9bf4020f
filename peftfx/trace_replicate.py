"""Trace each distinct repeated block once, then replicate its nodes for the other blocks.

``torch.export`` costs time in proportion to the nodes it traces, and a decoder of N identical layers is N
copies of one subgraph. So :func:`export_replicated` exports a *shallow view* of the model — every top-level
``nn.ModuleList`` of blocks cut to a prefix that holds each kind of block (the same module objects: nothing is
copied, real or ``meta`` weights alike) — with whatever export step the caller passes, and then copies, for every
block the prefix left out, the nodes of a prefix block of the same kind: ``get_attr`` targets, module paths in
``nn_module_stack`` renamed from block ``a`` to block ``j``, the residual stream wired from the previous block's
outputs, and the uses after the list moved to the last block's outputs.

Soundness is structural and conservative; anything unrecognised traces the whole model (one ``logging.info`` line
saying why):

* **Kinds.** Two blocks are of one kind when their module trees (path, class, train flag), parameters and buffers
  (name, shape, dtype, device), forward hooks and plain attributes (numbers, strings, flags, dtypes; an integer
  equal to the block's own index, such as ``layer_idx``, counts as "the index") agree, and so do the entries for
  their index of every config list as long as the block list (``layer_types``). Gemma-style alternating layers are
  two kinds. The prefix is the shortest one holding every consecutive pair of kinds the list has and ending in the
  last block's kind, at least two blocks, so every copied block has a traced model of itself *after a block like
  its predecessor*, and the code after the list reads the outputs of a block like the last.
* **Alignment.** Traced blocks of one kind must be the same graph node for node: same ops, same constants, the
  same meta under the renaming, parameters renamed block to block, inputs from the previous block in one-to-one
  correspondence. So layer-dependent code (a per-layer constant, a branch on ``layer_idx``) makes the prefix
  blocks differ and falls back.
* **Flow.** A block's values go only to later blocks, and only the last prefix block's to the code after the
  list; a value reaching further back than the previous block must be one the previous block reads too (a value
  passed along, as T5's position bias). Per-layer outputs (``output_hidden_states``, attentions) and per-layer
  caches break this and fall back; a key-value cache input falls back before any trace.

Modules: this one runs the steps; ``_replicate_plan`` (lists, kinds, prefixes, the shallow view),
``_replicate_check`` (blocks of the traced graph, flow and alignment checks), ``_replicate_copy`` (the copies).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from ._replicate_check import clean_path
from ._replicate_copy import _replicate
from ._replicate_plan import _plan, _shallow, _Unsound

__all__ = ["clean_path", "export_replicated", "info"]

log = logging.getLogger(__name__)

_STATS = {"replicated": 0, "whole": 0}


def export_replicated(model: nn.Module, kwargs: dict[str, Any], export: Callable[[], fx.GraphModule]) -> fx.GraphModule:
    """``export()`` (a ``torch.export`` of ``model`` returning the unlifted module) run on a shallow view of
    ``model`` and replicated to the whole model, or ``export()`` of the whole model where that is not sound."""
    lists, why = _plan(model, kwargs) if _enabled() else ([], "PEFTFX_TRACE_REPLICATE=0")
    if why:
        (log.info if lists else log.debug)("tracing %s whole: %s", type(model).__name__, why)
        return _whole(export)
    try:
        with _shallow(model, lists):
            gm = export()
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; the whole model may trace
        log.info("tracing %s whole: its shallow view failed to trace (%s: %s)", type(model).__name__,
                 type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
        return _whole(export)
    try:
        for lst in lists:
            _replicate(gm, model, lst)
        gm.graph.lint()
        gm.recompile()
    except _Unsound as e:
        log.info("tracing %s whole: blocks of %s cannot be replicated soundly: %s", type(model).__name__,
                 getattr(e, "list_path", "?"), e)
        return _whole(export)
    _STATS["replicated"] += 1
    return gm


def info() -> dict[str, int]:
    """How many traces were replicated from a shallow view and how many traced the whole model, in this process."""
    return dict(_STATS)


def _whole(export: Callable[[], fx.GraphModule]) -> fx.GraphModule:
    _STATS["whole"] += 1
    return export()


def _enabled() -> bool:
    return os.environ.get("PEFTFX_TRACE_REPLICATE", "1") not in ("0", "false", "off", "")
