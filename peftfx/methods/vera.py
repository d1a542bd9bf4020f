"""VeRA — Kopiczko et al. 2023, "VeRA: Vector-based Random Matrix Adaptation" (arXiv:2310.11454).

One pair of random matrices A ∈ ℝ^{r×in_max}, B ∈ ℝ^{out_max×r} is frozen and shared by every site of a
rule; each site trains only two vectors, b ∈ ℝ^out and d ∈ ℝ^r:

    y = W₀x + b₀ + Λ_b B Λ_d A dropout(x),    Δ = Λ_b B Λ_d A = diag(b) B[:out] diag(d) A[:, :in]

A site uses the top-left ``[out, in]`` slice of the shared pair, which is sized to the largest in/out of
the rule's sites (as Hugging Face PEFT does). A and B are Kaiming-uniform (bound √3·√2/√fan_in) drawn from a
CPU ``torch.Generator`` seeded with ``projection_prng_key``, A first, then B — the same matrices Hugging
Face PEFT draws for the same key and shapes. b starts at zero and d at ``d_initial``, so an untrained VeRA is
the identity. Merging adds Δ to the ``[out, in]`` weight view; unmerging subtracts it.

Checkpoints: A and B are non-persistent buffers (frozen: ``freeze`` trains parameters only; not in
``state_dict()`` and not in adapter checkpoints). An adapter checkpoint holds only the vectors
``vera_lambda_b``/``vera_lambda_d``; loading it re-applies the saved rule, whose ``projection_prng_key``
regenerates the same A and B.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._errors import RuleError
from ..rules import Selector, select
from .base import AdapterModule, MethodConfig, register_method

__all__ = ["VeRA", "VeRALinear", "VeRAProjection"]

# graph → {rule: shared projection}; the pair is sized from all sites a rule takes, so it is made once
_SHARED: "weakref.WeakKeyDictionary[fx.Graph, dict[VeRA, VeRAProjection]]" = weakref.WeakKeyDictionary()


@register_method
@dataclass(frozen=True)
class VeRA(MethodConfig):
    rank: int = 256
    dropout: float = 0.0
    targets: Selector | None = None
    d_initial: float = 0.1
    projection_prng_key: int = 0

    name: ClassVar[str] = "vera"
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "linear_t"})

    def validate(self) -> None:
        self.require_positive_int("rank")
        self.require_fraction("dropout")
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or not -2**63 <= key < 2**64:
            raise RuleError(f"VeRA projection_prng_key must be an int seed in [-2**63, 2**64), got {key!r}")

    def default_targets(self) -> Selector:
        return select.role("attn.q") | select.role("attn.v")

    def build(self, site, weight: torch.Tensor, roles: set[str] = frozenset()) -> AdapterModule:
        proj = self._projection(site.node.graph, weight.device, weight.dtype)
        return VeRALinear(proj, site.in_features, site.out_features, self.d_initial, self.dropout)

    def _projection(self, graph: fx.Graph, device, dtype) -> "VeRAProjection":
        per_graph = _SHARED.setdefault(graph, {})
        if self not in per_graph:
            out_max, in_max = self._largest_shape(graph)
            per_graph[self] = VeRAProjection(self.rank, in_max, out_max, self.projection_prng_key, device, dtype)
        return per_graph[self]

    def _largest_shape(self, graph: fx.Graph) -> tuple[int, int]:
        """(max out, max in) over the sites this rule takes in ``graph`` (matched the way ``plan`` does)."""
        from ..roles import assign_roles
        from ..sites import find_sites

        sites = find_sites(graph.owning_module)
        assign_roles(graph, sites)
        taken = [s for s in sites if self.selector.matches(s) and (self.decline_kind(s) or self.decline(s)) is None]
        return max(s.out_features for s in taken), max(s.in_features for s in taken)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−β, β), β = √3 · √2/√fan_in, fan_in = shape[1] (Kaiming uniform for ReLU gain)."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjection(nn.Module):
    """The frozen shared pair ``vera_A`` ``[r, in_max]`` and ``vera_B`` ``[out_max, r]`` (buffers)."""

    def __init__(self, rank: int, in_max: int, out_max: int, seed: int, device=None, dtype=None):
        super().__init__()
        self.seed = seed
        g = torch.Generator(device="cpu").manual_seed(seed)
        a = _kaiming_uniform((rank, in_max), g)
        b = _kaiming_uniform((out_max, rank), g)
        self.register_buffer("vera_A", a.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("vera_B", b.to(device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"rank={self.vera_A.shape[0]}, in_max={self.vera_A.shape[1]}, out_max={self.vera_B.shape[0]}, " \
               f"seed={self.seed}"


class VeRALinear(AdapterModule):
    """``forward(x, y) = y + b ⊙ (B[:out] (d ⊙ (A[:, :in] dropout(x))))``; trains ``vera_lambda_b``/``_d``."""

    mergeable: ClassVar[bool] = True

    def __init__(self, projection: VeRAProjection, in_features: int, out_features: int, d_initial: float,
                 dropout: float):
        super().__init__()
        kw = dict(device=projection.vera_A.device, dtype=projection.vera_A.dtype)
        self.in_features, self.out_features = in_features, out_features
        self.projection = projection
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((projection.vera_A.shape[0],), float(d_initial), **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.projection.vera_A[:, : self.in_features], self.projection.vera_B[: self.out_features, :])

    def delta(self) -> torch.Tensor:
        a, b = self._slices()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self._slices()
        h = self.vera_lambda_d * F.linear(self.dropout(x), a)
        return y + self.vera_lambda_b * F.linear(h, b)
