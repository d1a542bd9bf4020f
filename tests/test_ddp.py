"""DistributedDataParallel over a peftfx model: two CPU processes (gloo), different data per rank.

Checked: DDP registers only the adapter parameters (the reducer's parameter count and bytes), both ranks end
with identical adapters equal to one process training on the union of the data (gradients were averaged),
and the base is bit-identical on both ranks. The same run under FSDP2 (``fully_shard`` at the root, as the
README describes) reaches the same adapter values."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, LR = 3, 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(**llama):
    """A tiny Llama (``tests.models.llama(**llama)``) with LoRA on q/v, B drawn so the adapters start non-zero."""
    import peftfx
    from peftfx import LoRA
    from tests import models as M

    base = M.llama(**llama)
    pm = peftfx.apply(base, LoRA(rank=4, alpha=8), {"input_ids": M.ids(), "labels": M.ids()})
    with torch.no_grad():
        for m in pm.adapter_modules().values():
            torch.nn.init.normal_(m.lora_B, generator=torch.Generator().manual_seed(3), std=0.05)
    return pm


def _data(rank: int, step: int):
    from tests import models as M

    ids = M.ids(batch=2, seq=8, seed=100 + 10 * step + rank)
    return {"input_ids": ids, "labels": ids}


def _sgd(module: torch.nn.Module, loss_at) -> None:
    """``STEPS`` steps of SGD (``LR``) on ``module``'s trainable parameters; ``loss_at(step)`` is each step's loss."""
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)                      # same init on both ranks (DDP also broadcasts rank 0's)
        pm = _setup()
        base0 = {k: v.clone() for k, v in pm.state_dict().items() if ".lora." not in k}
        ddp = torch.nn.parallel.DistributedDataParallel(pm)
        log = ddp._get_ddp_logging_data()
        _sgd(ddp, lambda step: ddp(**_data(rank, step)).loss)
        fsdp = _fsdp2_run(rank)
        torch.save({"lora": {k: v for k, v in pm.state_dict().items() if ".lora." in k}, "fsdp2": fsdp,
                    "base_same": all(torch.equal(v, pm.state_dict()[k]) for k, v in base0.items()),
                    "n_params": log.get("num_parameter_tensors"), "bytes": log.get("total_parameter_size_bytes"),
                    "trainable": [(n, p.numel()) for n, p in pm.named_parameters() if p.requires_grad]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp2_run(rank: int):
    """The same training under FSDP2 (``fully_shard`` at the root): adapter values gathered, or None."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    torch.manual_seed(0)
    pm = _setup()
    fully_shard(pm)
    _sgd(pm, lambda step: pm(**_data(rank, step)).loss)
    return {n: p.full_tensor().detach().clone() for n, p in pm.named_parameters() if ".lora." in n}


def test_ddp_two_processes_sync_only_adapter_gradients(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["base_same"] and r1["base_same"]
    n_adapter = len(r0["trainable"])
    assert n_adapter == 8 and r0["n_params"] == n_adapter                   # 2 layers × (q, v) × (A, B)
    assert r0["bytes"] == 4 * sum(n for _, n in r0["trainable"])
    for k in r0["lora"]:
        assert torch.equal(r0["lora"][k], r1["lora"][k]), k                 # ranks agree bit for bit
    # reference: one process, each step on both ranks' batches (mean loss of equal halves = DDP's average)
    torch.manual_seed(0)
    pm = _setup()
    _sgd(pm, lambda step: sum(pm(**_data(r, step)).loss for r in (0, 1)) / 2)
    ref = {k: v for k, v in pm.state_dict().items() if ".lora." in k}
    start = _setup().state_dict()
    assert max((ref[k] - r0["lora"][k]).abs().max().item() for k in ref) < 1e-6
    assert max((ref[k] - start[k]).abs().max().item() for k in ref) > 1e-3   # they did train
    if r0["fsdp2"] is not None:                                              # FSDP2 (README) trains alike
        assert max((ref[k] - r0["fsdp2"][k]).abs().max().item() for k in ref) < 1e-6
