"""The pass contract and the pass manager. Every change peftfx makes to a graph is a pass run through here.

A pass is a function ``(graph module, …) → PassResult`` wrapped by :func:`graph_pass`, which gives it a name
and a contract, in the manner of ``torch.fx.passes.infra.pass_base`` and onnx-ir's pass infra:

  ``requires``   checks run on the input before the body (a failing one raises, nothing has changed yet)
  ``call``       the body; returns ``PassResult(graph_module, modified)``
  ``ensures``    checks run on the result (after the graph is linted: in a :class:`PassManager` run, the in-place
                 passes that modified a module are linted once, when the manager ends, and a failure names them;
                 a pass declared ``structural=False`` — it writes constant arguments or metadata only — is not)

Kinds, told apart by ``functional``:
  *in-place* passes (the default) rewrite the module they are given and return it;
  *functional* passes return a new module (a fork sharing parameters) and leave their input untouched.
  A functional pass takes ``inplace=True`` to work on its input instead (merge, unmerge, fold offer this to
  save memory); it is then an in-place run.
``modified`` always means "the graph now differs from the input's graph": a functional run that changes nothing
returns a fork with ``modified=False``. Every failure is a :class:`PassError` that names the pass (and the node,
where there is one).

:class:`PassManager` runs a list of bound passes (``splice_pass.bind(items)``) in order, threading the module
through them; ``apply``, ``merge``, ``export``, ``add_adapter``, ``train``/``eval`` and device moves are pass lists.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import fx

from .._errors import PassError

__all__ = ["PassResult", "Pass", "BoundPass", "PassManager", "graph_pass", "fail"]

log = logging.getLogger(__name__)

Check = Callable[[fx.GraphModule], "str | None"]


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


def fail(pass_name: str, message: str, node: fx.Node | None = None) -> PassError:
    """The one form of a pass failure: ``pass 'name': message`` and the node, formatted, when there is one."""
    where = f"\n  at node: {node.format_node()}" if node is not None else ""
    return PassError(f"pass '{pass_name}': {message}{where}")


class Pass:
    """A named graph pass with its contract (see the module docstring). Call it like the function it wraps."""

    def __init__(self, fn: Callable[..., PassResult], name: str, *, functional: bool = False,
                 requires: Sequence[Check] = (), ensures: Sequence[Check] = (), structural: bool = True):
        functools.update_wrapper(self, fn)
        self.fn, self.name, self.functional, self.structural = fn, name, functional, structural
        self.requires, self.ensures = tuple(requires), tuple(ensures)

    @property
    def pass_name(self) -> str:
        return self.name

    def __call__(self, gm: fx.GraphModule, *args: Any, **kwargs: Any) -> PassResult:
        for check in self.requires:
            reason = check(gm)
            if reason:
                raise fail(self.name, f"precondition broken: {reason}")
        result = self.fn(gm, *args, **kwargs)
        if not isinstance(result, PassResult):
            raise fail(self.name, f"returned {type(result).__name__}, expected PassResult")
        in_place_run = not self.functional or kwargs.get("inplace", False)
        if not in_place_run and result.graph_module is gm:
            raise fail(self.name, "is functional but returned its input; it must return a new module")
        if in_place_run and result.graph_module is not gm:
            raise fail(self.name, "is an in-place run but returned a different module")
        if result.modified:
            out = result.graph_module
            graph = out.graph              # counted: a cached analysis is keyed by it (peftfx.plan)
            graph.__dict__["_peftfx_edits"] = graph.__dict__.get("_peftfx_edits", 0) + 1
            if not self.structural:               # it only rewrote constant arguments or metadata: no lint
                pass
            elif "_peftfx_lint" in out.__dict__:  # a PassManager runs on it: linted once when it ends
                out.__dict__["_peftfx_lint"].append(self.name)
            else:
                _lint(out, [self.name])
            if out.__dict__.get("_peftfx_defer_recompile") and not getattr(type(out), "_peftfx_defers", False):
                out.__dict__["_peftfx_dirty"] = True     # one recompile when the manager ends
            else:
                out.recompile()       # a PeftModel defers by itself (and records that other graphs are stale)
        for check in self.ensures:
            reason = check(result.graph_module)
            if reason:
                raise fail(self.name, f"postcondition broken: {reason}")
        log.debug("pass %s: modified=%s", self.name, result.modified)
        return result

    def bind(self, *args: Any, **kwargs: Any) -> "BoundPass":
        """This pass with its arguments, ready for a :class:`PassManager`."""
        return BoundPass(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<{'functional' if self.functional else 'in-place'} pass {self.name!r}>"


def _lint(gm: fx.GraphModule, names: list[str]) -> None:
    """``graph.lint()`` once for the in-place passes ``names`` that modified ``gm`` in one manager run (a lint of a
    4,000-node graph takes milliseconds); a failure names them, the first as the pass that failed."""
    try:
        gm.graph.lint()
    except Exception as e:  # lint raises RuntimeError with the bad node in its text
        later = f" (or one run after it: {', '.join(names[1:])})" if len(names) > 1 else ""
        raise fail(names[0], f"left an invalid graph{later}: {e}") from e


@dataclass(frozen=True)
class BoundPass:
    pass_: Pass
    args: tuple
    kwargs: dict

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.pass_(gm, *self.args, **self.kwargs)


def graph_pass(name: str, *, functional: bool = False, requires: Sequence[Check] = (),
               ensures: Sequence[Check] = (), structural: bool = True) -> Callable[[Callable[..., PassResult]], Pass]:
    """Decorate a pass body: ``@graph_pass("splice", ensures=[...])``. See the module docstring. ``structural=False``:
    the pass never adds, removes or rewires a node, nor changes a target — it only writes constant arguments or
    node metadata — so its result is not linted."""

    def deco(fn: Callable[..., PassResult]) -> Pass:
        return Pass(fn, name, functional=functional, requires=requires, ensures=ensures, structural=structural)

    return deco


class PassManager:
    """Run bound passes in order; each gets the module the previous one returned. The result's ``modified``
    is true when any pass modified the graph. A failure propagates as the failing pass's :class:`PassError`."""

    def __init__(self, passes: Sequence[BoundPass | Callable[[fx.GraphModule], PassResult]]):
        self.passes = list(passes)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        """Code is generated once, after the last pass (a 4,000-node graph takes ~45 ms per recompile): in-place
        passes on the same module mark it dirty instead; passes and their checks read the graph, not the code."""
        modified = False
        touched, linted = [], []
        try:
            for p in self.passes:
                if "_peftfx_defer_recompile" not in gm.__dict__:
                    gm.__dict__["_peftfx_defer_recompile"] = True
                    touched.append(gm)
                if "_peftfx_lint" not in gm.__dict__:      # the passes that modify it, linted once at the end
                    gm.__dict__["_peftfx_lint"] = []
                    linted.append(gm)
                result = p(gm)
                gm, modified = result.graph_module, modified or result.modified
            for m in linted:
                if m.__dict__["_peftfx_lint"]:
                    _lint(m, m.__dict__["_peftfx_lint"])
        finally:
            for m in linted:
                del m.__dict__["_peftfx_lint"]
            for m in touched:
                del m.__dict__["_peftfx_defer_recompile"]
                if m.__dict__.pop("_peftfx_dirty", False):
                    m.recompile()
        return PassResult(gm, modified)

    def __repr__(self) -> str:
        names = [p.pass_.name if isinstance(p, BoundPass) else getattr(p, "__name__", repr(p)) for p in self.passes]
        return f"PassManager({' → '.join(names)})"
