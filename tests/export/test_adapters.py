"""One base, many adapters: one ONNX file with LoRA A/B as named inputs serves two differently trained adapters
(ONNX Runtime adapter files, switched per request in one session) and, with none active, the base model — each
equal to its PyTorch model; files that do not fit are refused before anything runs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import peftfx
from peftfx import CheckpointError, ExportError, LoRA, select
from peftfx.export import Runtime, adapter_inputs, export_onnx, write_onnx_adapter
from tests import models as M

TOL = 1e-4
RULES = LoRA(rank=4, alpha=8, targets=select.role("attn.q") | select.role("attn.v") | select.role("mlp.down"))


def _trained(base, ids, target_token, steps=8):
    """A LoRA adapter trained a few Adam steps to push every position towards ``target_token``."""
    pm = peftfx.apply(base, RULES, {"input_ids": ids})
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    pm.train()
    for _ in range(steps):
        logits = pm(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.full((logits.shape[0] * logits.shape[1],),
                                                                                target_token))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = M.llama()
    ids = M.ids(2, 8)
    a, b = _trained(base, ids, 7), _trained(base, ids, 11)
    out = tmp_path_factory.mktemp("multi")
    # optimize="none": the fusions are tests/export/test_optimize.py's subject; verification in ORT still runs
    report = export_onnx(a, out / "base.onnx", {"input_ids": ids}, adapter_inputs=True, optimize="none")
    files = {"a": write_onnx_adapter(a, out / "a.onnx_adapter", model=report.path),
             "b": write_onnx_adapter(b, out / "b.onnx_adapter", model=report.path)}
    return base, a, b, report, files, out


def test_input_names_come_from_the_site_list(served):
    base, a, b, report, files, out = served
    names = [e.name for e in adapter_inputs(a)]
    assert report.adapter_inputs == names == [k for k in a.state_dict() if "lora_" in k]
    assert len(names) == 2 * 3 * 2          # A and B × (q, v, down) × 2 layers
    assert report.max_abs < TOL and {c["case"] for c in report.checks} >= {"batch 1 × seq 8, no adapter"}
    import onnx

    proto = onnx.load(report.path)
    assert set(names) <= {i.name for i in proto.graph.input}
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in names}
    assert set(defaults) == set(names) and all(not v.any() for v in defaults.values())     # zeros = base
    assert json.loads({p.key: p.value for p in proto.metadata_props}["peftfx.adapter_inputs"])[0][0] == names[0]


@pytest.mark.parametrize("io_binding", [False, True])
def test_two_trained_adapters_and_the_base_in_one_session(served, io_binding):
    base, a, b, report, files, out = served
    rt = Runtime(report.path, io_binding=io_binding)
    for name, path in files.items():
        rt.load_adapter(name, path)
    x = M.ids(3, 11, seed=5)
    with torch.no_grad():
        want = {"a": a(input_ids=x).logits.numpy(), "b": b(input_ids=x).logits.numpy(),
                None: base(input_ids=x).logits.numpy()}
    assert np.abs(want["a"] - want["b"]).max() > 0.5           # the two adapters really differ
    assert (want["a"].argmax(-1) == 7).mean() > 0.5 and (want["b"].argmax(-1) == 11).mean() > 0.5   # trained
    for name in ["a", "b", None, "a", None, "b"]:                # switched per request, same session
        got = rt.run({"input_ids": x}, adapter=name)["logits"]
        assert np.abs(got - want[name]).max() < TOL, name


def test_adapter_files_from_a_checkpoint_folder_and_from_the_model_are_identical(served, tmp_path):
    base, a, b, report, files, out = served
    peftfx.save_adapter(b, tmp_path / "b_ckpt")
    again = write_onnx_adapter(tmp_path / "b_ckpt", tmp_path / "b2.onnx_adapter", model=report.path)
    from peftfx.export.adapters import read_onnx_adapter

    v1, p1 = read_onnx_adapter(files["b"])
    v2, p2 = read_onnx_adapter(again)
    assert v1 == v2 and sorted(p1) == sorted(p2) and all(np.array_equal(p1[k], p2[k]) for k in p1)


def test_adapters_that_do_not_fit_are_refused(served, tmp_path):
    base, a, b, report, files, out = served
    other = peftfx.apply(base, LoRA(rank=8, targets=select.role("attn.q") | select.role("attn.v")
                                    | select.role("mlp.down")), {"input_ids": M.ids(2, 8)})
    with pytest.raises(CheckpointError, match=r"does not fit this model \(.*lora_A: adapter shape \[8, 64\], "
                                              r"model needs \[4, 64\]"):
        write_onnx_adapter(other, tmp_path / "x.onnx_adapter", model=report.path)
    assert not os.listdir(tmp_path)
    # a file written without the model check is caught when the Runtime loads it
    loose = write_onnx_adapter(other, tmp_path / "loose.onnx_adapter")
    rt = Runtime(report.path)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        rt.load_adapter("x", loose)
    with pytest.raises(ExportError, match=r"no adapter named 'x' is loaded"):
        rt.run({"input_ids": M.ids(1, 3)}, adapter="x")
    plain = Runtime(out / "base.onnx")
    assert plain.inputs == {"input_ids": ["batch", "sequence"]}
