"""FSDP2 per block: ``fully_shard`` on each repeated block of a peftfx model, then on the root.

    from peftfx.integrations.fsdp import fully_shard_blocks
    peft = peftfx.apply(model, LoRA(rank=16), ex)
    fully_shard_blocks(peft)                 # one FSDP unit per block (model.layers.N) and one at the root
    peftfx.gradient_checkpointing(peft)      # optional, composes
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)

The model then runs its layered view (:mod:`peftfx.layers`): each block is a submodule that registers exactly the
parameters its part of the graph reads (its base weights and its adapters), so FSDP2 gathers one block's parameters
for that block's forward (and again for its backward) and frees them after; the root unit holds the rest
(embeddings, final norm, head). Limits: the model's own graph (the ``apply`` signature, train mode) and its train/eval
switch run sharded, and so do the graphs of other call signatures and of eval mode (:mod:`peftfx.variants`): they
call the same block and root modules, so FSDP2 gathers for them too. Passes that rewrite weights (merge, export) need
the full parameters: gather them first (a full state dict). The module ``apply`` traced (kept for its config,
``generate`` and the graphs of other signatures) referenced every base weight in full, so each rank held its shard on
top of the whole model; :func:`fully_shard_blocks` therefore ends with :func:`release_original`, which replaces those
references by storage-free stand-ins (after a plain ``fully_shard(pm)``, call it yourself). Building on ``meta`` and
materialising after sharding is the other usual FSDP2 recipe; it is not tested here.

Measuring what a rank holds (:func:`local_bytes`, :func:`gathered_bytes`, :class:`GatheredPeak`): deterministic
byte counts of parameter storage, not a process's RSS — its shards, and the unsharded parameters FSDP2 has gathered
at a given moment (a parameter FSDP2 has gathered is registered on its module as a plain tensor, a resharded one
as a ``DTensor``). Transient buffers (the all-gather's flat buffer, unsharded gradients before their
reduce-scatter), activations and optimizer state are not counted.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import PeftfxError
from ..layers import layered, partition
from ..model import PeftModel, require_peft

__all__ = ["GatheredPeak", "fully_shard_blocks", "gathered_bytes", "local_bytes", "original_bytes", "release_original"]


def fully_shard_blocks(pm: PeftModel, *, release: bool = True, **fsdp_kwargs: Any) -> list[str]:
    """``torch.distributed.fsdp.fully_shard`` each repeated block of ``pm`` (in order) and then ``pm`` itself, with
    ``fsdp_kwargs`` (``mesh``, ``reshard_after_forward``, ``mp_policy`` …) for every unit. Returns the unit paths,
    the root last as ``""``. Raises :class:`~peftfx.PeftfxError` (before sharding anything) when the graph has no
    repeated blocks, or when a block's parameter is also read outside that block (a tied weight): such a model can
    only be sharded at the root (``fully_shard(pm)``). ``release`` (default): then free the full base tensors the
    original module still holds (:func:`release_original`; that module is left holding zeros)."""
    require_peft(pm, "fully_shard_blocks")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch < 2.6
        raise PeftfxError(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available in this torch: {e}") from e
    part = partition(pm)
    for n in pm.graph.nodes:
        if n.op == "get_attr" and not part.owner[n]:
            hit = next((b for b in part.blocks if str(n.target).startswith(b + ".")), None)
            if hit is not None:
                raise PeftfxError(f"{n.target} belongs to block {hit} but is also read outside it (a tied weight?), "
                                  "so that block cannot be its own FSDP unit; shard at the root: fully_shard(model).")
    units = layered(pm, sharded=True)         # other signatures/modes run these modules too
    for block in units:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(pm, **fsdp_kwargs)
    if release:
        release_original(pm)
    return [*part.blocks, ""]


def release_original(pm: PeftModel) -> int:
    """Free the full base tensors that the module ``pm`` was traced from still holds after ``pm`` was sharded
    (``fully_shard_blocks`` calls it; call it after a plain ``fully_shard(pm)``). Returns the bytes released.

    ``peftfx.apply`` keeps the original module (for its config, ``generate`` and the graphs of other call
    signatures), and until now it referenced every base weight in full: sharding ``pm`` gave each rank its shard *on
    top of* the whole model. Each of the original module's parameters that ``pm`` no longer uses is replaced by a
    stand-in of the same shape, dtype and device backed by a single zero (``torch.zeros(()).expand(shape)``; tied
    weights stay tied). Graphs traced later from the original module (another signature, eval mode) only read
    shapes from it, and their weights are rebound to ``pm``'s (sharded) parameters, so outputs are unchanged. The
    original module itself then holds zeros: like FSDP2's ``fully_shard``, this changes the module handed to
    ``peftfx.apply`` in place (get the trained weights from ``pm``: a full state dict, or the adapter folder).
    ``pm.get_input_embeddings()`` / ``get_output_embeddings()`` answer from that module, so their weights are
    stand-ins too: read weights from ``pm``'s own (sharded) parameters. Buffers (BatchNorm statistics, rotary
    tables) are kept."""
    from torch.distributed.tensor import DTensor

    require_peft(pm, "release_original")
    origin = pm.__dict__.get("_peftfx_origin")
    if origin is None:
        return 0
    live = {id(p) for p in pm.parameters()}
    memo: dict[int, nn.Parameter] = {}
    freed = original_bytes(pm)
    for module in origin[0].modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in live or isinstance(p, DTensor) or p.device.type == "meta":
                continue
            if id(p) not in memo:
                stand_in = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
                memo[id(p)] = nn.Parameter(stand_in, requires_grad=p.requires_grad)
            module._parameters[name] = memo[id(p)]
    return freed - original_bytes(pm)


def original_bytes(pm: PeftModel) -> int:
    """Bytes of parameter storage the original module of ``pm`` holds apart from ``pm``'s own parameters."""
    origin = pm.__dict__.get("_peftfx_origin")
    if origin is None:
        return 0
    from torch.distributed.tensor import DTensor

    mine = {(p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr() for p in pm.parameters()}
    return _distinct_storages(p for p in origin[0].parameters()
                              if p.device.type != "meta" and p.untyped_storage().data_ptr() not in mine)


def _distinct_storages(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameter storage this rank holds for ``module`` at rest: its shards of sharded parameters (the
    local tensors of ``DTensor`` parameters) plus any parameter not sharded."""
    from torch.distributed.tensor import DTensor

    return _distinct_storages(p.to_local() if isinstance(p, DTensor) else p for p in module.parameters())


def gathered_bytes(module: nn.Module) -> int:
    """Bytes of unsharded parameter storage FSDP2 holds for ``module`` right now: the parameters currently
    registered as plain tensors while their FSDP2 unit is gathered (distinct storages). On a model with no FSDP2
    units it counts every parameter."""
    from torch.distributed.tensor import DTensor

    return _distinct_storages(p for p in module.parameters() if not isinstance(p, DTensor))


class GatheredPeak:
    """``with GatheredPeak(model) as peak: train_step()`` → ``peak.bytes``: the most unsharded parameter bytes
    (:func:`gathered_bytes`) alive at once. Sampled at every module's forward entry and exit (after FSDP2's own
    hooks have gathered) and at every tensor autograd saves in forward and reads back in backward
    (``torch.autograd.graph.saved_tensors_hooks``), so the backward's re-gathers are seen op by op."""

    def __init__(self, module: nn.Module):
        self.module, self.bytes, self._handles, self._hooks = module, 0, [], None

    def sample(self) -> None:
        self.bytes = max(self.bytes, gathered_bytes(self.module))

    def __enter__(self) -> GatheredPeak:  # noqa: PYI034 (typing.Self needs Python 3.11)
        def hook(*_: Any) -> None:
            self.sample()

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.sample()
            return t

        def unpack(t: torch.Tensor) -> torch.Tensor:
            self.sample()
            return t

        for m in self.module.modules():
            self._handles += [m.register_forward_pre_hook(hook), m.register_forward_hook(hook)]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._hooks.__enter__()
        self.sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles = []
