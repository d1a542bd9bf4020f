"""The role-detector registry and the pipeline that runs it.

A detector is a function ``fn(ctx: RoleContext) -> None`` that adds roles (and maybe ``slices``) to the sites in
``ctx.sites``, registered with :func:`register_detector` under a name, the roles it may emit, and its place in the
pipeline: it runs after every detector named in ``after``; among detectors free to run, lower ``order`` runs first
(ties by name). So the order is declared, not implied by import or code order::

    @register_detector("pooler", roles=("pooler",), order=25, after="mlp")
    def detect_pooler(ctx: RoleContext) -> None:
        for s in ctx.sites:
            ...
            s.roles.add("pooler")

After each detector runs, :func:`assign_roles` checks that it added only the roles it declared.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Callable, Iterable, Iterator

import networkx as nx
from torch import fx

from .._errors import DetectorError, PassError
from ..sites import Site
from ._graph import Attention, attention_nodes, dataflow_graph, weight_ops

__all__ = ["Detector", "DetectorError", "RoleContext", "DETECTORS", "ROLES", "register_detector",
           "unregister_detector", "pipeline", "role_names", "assign_roles"]


class RoleContext:
    """What the detectors of one :func:`assign_roles` call share: the fx graph, its sites, ``by_node``
    (site node → site, for every call of a shared site), ``stop`` (the site nodes: walks end at the first site they meet), and, computed once on
    first use, ``dataflow`` (the networkx tensor data-flow graph), ``attention`` (every attention op as
    (node, q, k, v, output)) and ``blocked`` (nodes no walk crosses)."""

    def __init__(self, graph: fx.Graph, sites: Iterable[Site]):
        self.graph = graph
        self.sites: list[Site] = list(sites)
        # every call of a site (a module called several times is one site with several nodes)
        self.by_node: dict[fx.Node, Site] = {n: s for s in self.sites for n in s.nodes}
        self.stop: set[fx.Node] = set(self.by_node)

    @cached_property
    def dataflow(self) -> nx.DiGraph:
        return dataflow_graph(self.graph)

    @cached_property
    def attention(self) -> list[Attention]:
        return attention_nodes(self.graph)

    @cached_property
    def blocked(self) -> set[fx.Node]:
        """Attention ops and their outputs, and weight ops that are not sites (an op peftfx cannot adapt, e.g. a
        convolution): a projection found beyond one would belong to another block."""
        attn = self.attention
        return {a[0] for a in attn} | {a[4] for a in attn} | (weight_ops(self.graph) - self.stop)


@dataclass(frozen=True)
class Detector:
    """A registered role detector: ``run(ctx)`` adds some of ``roles`` to sites of ``ctx``."""
    name: str
    roles: tuple[str, ...]
    run: Callable[[RoleContext], None]
    order: float = 0.0
    after: tuple[str, ...] = ()

    def __call__(self, ctx: RoleContext) -> None:
        self.run(ctx)


_REGISTRY: dict[str, Detector] = {}
#: name → :class:`Detector`, in registration order (read-only, live); :func:`pipeline` gives the run order
DETECTORS = MappingProxyType(_REGISTRY)


def register_detector(name: str, *, roles: Iterable[str], order: float = 0.0,
                      after: str | Iterable[str] = ()) -> Callable[[Callable[[RoleContext], None]], Detector]:
    """Decorator: register ``fn(ctx)`` as the detector ``name`` emitting ``roles``; returns the :class:`Detector`.
    A name is taken once; registering the same function again (a module reload) replaces it in place."""
    roles = tuple(roles)
    after = (after,) if isinstance(after, str) else tuple(after)
    if not isinstance(name, str) or not name:
        raise DetectorError(f"a detector name is a non-empty string, got {name!r}")
    if not all(isinstance(r, str) and r for r in roles):
        raise DetectorError(f"detector {name!r}: roles are non-empty strings, got {roles!r}")

    def decorate(fn: Callable[[RoleContext], None]) -> Detector:
        old = _REGISTRY.get(name)
        if old is not None and _origin(old.run) != _origin(fn):    # the same function again is a module reload
            raise DetectorError(f"a role detector named {name!r} is already registered "
                                f"({_REGISTRY[name].run!r}); pick another name or unregister_detector({name!r})")
        det = Detector(name, roles, fn, float(order), after)
        _REGISTRY[name] = det
        return det
    return decorate


def _origin(fn: Callable) -> tuple[str | None, str | None]:
    return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def unregister_detector(name: str) -> Detector:
    """Remove the detector ``name`` from the registry and return it."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise DetectorError(f"no role detector named {name!r}; registered: {', '.join(_REGISTRY)}") from None


def pipeline() -> list[Detector]:
    """The registered detectors in run order: each after those named in its ``after``; among those free to run,
    lower ``order`` first, then name."""
    dets = dict(_REGISTRY)
    for d in dets.values():
        missing = [a for a in d.after if a not in dets]
        if missing:
            raise DetectorError(f"detector {d.name!r} runs after {', '.join(missing)}, which is not registered; "
                                f"registered: {', '.join(dets)}")
    waiting = {n: set(d.after) for n, d in dets.items()}
    ready = [(d.order, n) for n, d in dets.items() if not d.after]
    heapq.heapify(ready)
    out: list[Detector] = []
    while ready:
        _, n = heapq.heappop(ready)
        out.append(dets[n])
        for m, deps in waiting.items():
            if n in deps:
                deps.discard(n)
                if not deps:
                    heapq.heappush(ready, (dets[m].order, m))
    if len(out) != len(dets):
        stuck = sorted(set(dets) - {d.name for d in out})
        raise DetectorError(f"role detectors {', '.join(stuck)} wait on each other through 'after'; "
                            "break the cycle")
    return out


def role_names() -> tuple[str, ...]:
    """Every role the registered detectors may emit, in pipeline order (first declaration wins)."""
    return tuple(dict.fromkeys(r for d in pipeline() for r in d.roles))


class _LiveRoles(Sequence):
    """A read-only sequence of :func:`role_names`, evaluated on every use, so ``from peftfx.roles import ROLES``
    sees detectors registered later."""

    def __getitem__(self, i):
        return role_names()[i]

    def __len__(self) -> int:
        return len(role_names())

    def __iter__(self) -> Iterator[str]:
        return iter(role_names())

    def __contains__(self, role: object) -> bool:
        return role in role_names()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and role_names() == tuple(other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(role_names())


#: every role the registered detectors may emit (a live, read-only sequence; see :func:`role_names`)
ROLES = _LiveRoles()


def assign_roles(graph: fx.Graph, sites: Iterable[Site]) -> None:
    """Fill ``site.roles`` (and ``site.slices`` for fused projections) in place by running every registered
    detector in :func:`pipeline` order."""
    ctx = RoleContext(graph, sites)
    for det in pipeline():
        before = [set(s.roles) for s in ctx.sites]
        det(ctx)
        for s, had in zip(ctx.sites, before):
            extra = s.roles - had - set(det.roles)
            if extra:
                raise PassError(f"role detector {det.name!r} gave {s.node.format_node()} the role(s) "
                                f"{', '.join(sorted(extra))}, which it does not declare (roles={det.roles!r}); "
                                "add them to its register_detector(roles=...)")
