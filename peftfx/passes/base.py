"""The pass contract: a pass is a function ``(PeftModel, …) → PassResult`` that states whether it mutates,
checks its preconditions, and ends by linting and recompiling. A failure names the pass and the node."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

from torch import fx

from .._errors import PassError

__all__ = ["PassResult", "graph_pass", "fail"]

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


def fail(pass_name: str, message: str, node: fx.Node | None = None) -> PassError:
    where = f"\n  at node: {node.format_node()}" if node is not None else ""
    return PassError(f"pass '{pass_name}': {message}{where}")


def graph_pass(name: str, *, inplace: bool = True) -> Callable:
    """Decorate a pass body. ``inplace=True`` passes rewrite the module they get; functional passes
    return a new module and leave theirs untouched. Either way the result is linted and recompiled."""

    def deco(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        @functools.wraps(fn)
        def run(gm: fx.GraphModule, *args, **kwargs) -> PassResult:
            result = fn(gm, *args, **kwargs)
            if not isinstance(result, PassResult):
                raise fail(name, f"returned {type(result).__name__}, expected PassResult")
            if not inplace and not kwargs.get("inplace") and result.modified and result.graph_module is gm:
                raise fail(name, "is functional but modified its input in place")
            if result.modified:
                try:
                    result.graph_module.graph.lint()
                except Exception as e:  # lint raises RuntimeError with the bad node in its text
                    raise fail(name, f"left an invalid graph: {e}") from e
                result.graph_module.recompile()
            log.debug("pass %s: modified=%s", name, result.modified)
            return result

        run.pass_name = name  # type: ignore[attr-defined]
        run.inplace = inplace  # type: ignore[attr-defined]
        return run

    return deco
