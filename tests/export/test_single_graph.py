"""Exporting leaves the user's model as it was: ``export_onnx`` picks one graph (``_single_graph``: the eval-mode
variant of a train-traced model) on the export's private fork, so the graphs the user's model keeps per mode and
call signature, their state and the model's outputs are unchanged, and a second export equals the first.

References: the model's own outputs before the exports (equal bit for bit after them), ONNX Runtime against the
eval-mode PyTorch model (≤ 1e-5), the two exported files against each other (equal)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import peftfx
from peftfx import LoRA, select
from peftfx.export import Runtime, export_onnx
from peftfx.export.onnx import _single_graph


class _Net(nn.Module):
    """Mode-dependent (BatchNorm statistics, dropout): its train- and eval-mode graphs differ."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _snapshot(pm):
    reg = pm.peft_variants
    return reg, dict(reg.graphs), {k: sorted(g.__dict__) for k, g in reg.graphs.items()}


def test_two_exports_leave_the_model_and_its_graphs_unchanged(tmp_path):
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    pm = peftfx.apply(model, LoRA(rank=2, targets=select.name("fc1", "fc2")), {"x": torch.randn(4, 8)})
    for p in pm.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.2)
    x = torch.randn(5, 8)
    pm.eval()
    with torch.no_grad():
        want = pm(x=x)                                     # builds the eval-mode graph in the model's registry
    pm.train()
    reg, graphs, keys = _snapshot(pm)
    assert graphs and all("_peftfx_variants" not in g.__dict__ for g in graphs.values())
    state = {k: v.clone() for k, v in pm.state_dict().items()}

    paths = [str(tmp_path / f"m{i}.onnx") for i in range(2)]
    for path in paths:
        export_onnx(pm, path, {"x": torch.randn(3, 8)}, optimize="none")
    assert pm.training and pm.peft_variants is reg and "_peftfx_variants" in pm.__dict__
    assert dict(reg.graphs) == graphs and all(reg.graphs[k] is g for k, g in graphs.items())
    assert {k: sorted(g.__dict__) for k, g in reg.graphs.items()} == keys
    assert all(torch.equal(v, state[k]) for k, v in pm.state_dict().items())
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(x=x), want)                  # the same graph, the same weights, the same outputs
    got = [Runtime(p, device="cpu").run({"x": x.numpy()}) for p in paths]
    np.testing.assert_allclose(next(iter(got[0].values())), want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(next(iter(got[0].values())), next(iter(got[1].values())))
    pm.train()
    torch.manual_seed(1)
    pm(x=torch.randn(4, 8)).sum().backward()               # still trains after the exports
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)


def test_single_graph_on_the_users_model_takes_nothing_from_it():
    """Even handed the user's model itself (export hands it a private fork), ``_single_graph`` returns its cached
    eval-mode graph without changing it or the registry: the ``_peftfx_variants`` it pops is absent on a variant."""
    torch.manual_seed(0)
    pm = peftfx.apply(_Net(), LoRA(rank=2, targets=select.name("fc1")), {"x": torch.randn(4, 8)})
    x = torch.randn(3, 8)
    pm.eval()
    with torch.no_grad():
        want = pm(x=x)
    pm.train()
    reg, graphs, keys = _snapshot(pm)
    one = _single_graph(pm, {"x": x})
    assert one in graphs.values() and one is not pm
    assert pm.peft_variants is reg and dict(reg.graphs) == graphs
    assert {k: sorted(g.__dict__) for k, g in reg.graphs.items()} == keys
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(x=x), want) and torch.equal(one(x=x), want)
