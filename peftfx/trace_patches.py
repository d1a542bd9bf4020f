"""Tracing hooks: model settings switched for the duration of a ``torch.export`` trace, then restored.

Mixture-of-experts (transformers 5): experts set to the ``"eager"`` implementation loop over the experts that
received tokens (``nonzero`` → a data-dependent Python loop), which ``torch.export`` cannot trace. For the trace
they run ``"batched_mm"`` (gather each token's expert weights, ``bmm``: the same arithmetic, the same outputs),
as transformers' own exporters do; the model's setting is restored afterwards. Other implementations (the default
grouped matmul) trace as they are and are left alone."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from torch import nn

__all__ = ["traceable_experts"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def traceable_experts(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s eager MoE experts as ``batched_mm`` inside the block (no-op for other models)."""
    get = getattr(model, "get_experts_implementation", None)
    can = getattr(type(model), "_can_set_experts_implementation", None)
    try:
        before = get() if callable(get) and callable(can) and can() else None
    except Exception:                               # pragma: no cover - an unusual config: leave it alone
        before = None
    eager = {k: v for k, v in (before or {}).items() if v == "eager"}
    if not eager:
        yield
        return
    log.info("tracing %s with its experts as batched_mm (eager experts loop over data-dependent expert ids)",
             type(model).__name__)
    model.set_experts_implementation({**before, **{k: "batched_mm" for k in eager}})
    try:
        yield
    finally:
        model.set_experts_implementation(before)
