"""One conformance suite for every registered method (DESIGN.md, "One conformance test for every method").

Every test below that takes the ``applied`` fixture runs once per entry of ``peftfx.METHODS`` (name → config
class), so a newly registered method inherits all the checks with no edit here. Per method, on a tiny random
Llama (2 layers, hidden 32, 4 heads / 2 kv heads, vocab 64) with ``input_ids`` of batch 2 × seq 5:

* config      the default config ``cls()`` applies to the model (a method may offer a classmethod
              ``conformance_example()`` returning the config to use instead);
* apply       only adapter parameters require grad, and there are some;
* identity    right after apply the output equals the base model's (site methods, whose adapters start as the
              identity) or has its shape (graph-level methods, ``graph_level = True``: virtual tokens);
* live        after every trainable parameter is perturbed (seeded noise) the output differs from the base's
              and from the untrained adapter's;
* merge       merged == unmerged; a method with a mergeable adapter leaves fewer adapter nodes; unmerge gives
              the unmerged output back and the base weights within 1e-6; the caller's model is untouched;
* fold        ``fold`` (eval mode) == unfolded;
* checkpoint  ``save_adapter`` → ``load_adapter`` on a fresh copy of the base == the saved model; and one
              fresh Python process loads a saved adapter of every method (discovery needs no test import);
* export      ``export_onnx`` of the merged model run in ONNX Runtime on batch 3 × seq 7 == eager.

Tolerances (float32, logits of magnitude ≲ 1): 1e-5 where the computation is reordered (merge folds ΔW into W,
fold precomputes constants, identity adds exact zeros through a different op order), 1e-6 for a checkpoint
round trip and unmerged weights (the same tensors, up to one add/subtract of ΔW), 1e-4 for ONNX Runtime against
eager (other kernels; the tolerance ``export_onnx`` itself uses for float32), > 1e-4 for "the adapter is live".
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import peftfx
from tests import models as M

TOL_REORDER = 1e-5     # merge / unmerge / fold / identity: the same maths in another order
TOL_EXACT = 1e-6       # checkpoint round trip; base weights after merge → unmerge
TOL_ORT = 1e-4         # ONNX Runtime vs eager PyTorch (float32)
LIVE = 1e-4            # perturbed adapters must move the logits by more than this
NOISE = 0.05           # p += NOISE · N(0, 1) on every trainable parameter

VOCAB = 64
METHOD_NAMES = sorted(peftfx.METHODS)


def _base_model():
    return M.llama(layers=2, hidden=32, inter=64, heads=4, kv_heads=2, vocab=VOCAB, seed=0)


def _config(cls):
    """The config the suite uses for a method: ``cls.conformance_example()`` if it has one, else ``cls()``."""
    example = getattr(cls, "conformance_example", None)
    return example() if example is not None else cls()


def _is_graph_level(cls) -> bool:
    return bool(getattr(cls, "graph_level", False))


def _perturb(peft, seed: int = 1234) -> None:
    """Seeded noise on every trainable parameter, in name order, so every check below is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(peft.named_parameters()):
            if p.requires_grad:
                p.add_(NOISE * torch.randn(p.shape, generator=g, dtype=p.dtype))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def _max_diff(a, b) -> float:
    return (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item()


def _adapter_of(target: str, adapters) -> str | None:
    return next((a for a in adapters if target == a or target.startswith(a + ".")), None)


def _adapter_calls(pm) -> int:
    """call_module nodes that run an adapter (or a submodule of one)."""
    adapters = pm.peft_info.adapters
    return sum(1 for n in pm.graph.nodes if n.op == "call_module" and _adapter_of(str(n.target), adapters))


@dataclass
class Base:
    model: torch.nn.Module
    ids: torch.Tensor          # batch 2 × seq 5
    logits: torch.Tensor
    state: dict[str, torch.Tensor]


@dataclass
class Applied:
    name: str
    cls: type
    model: torch.nn.Module     # the user's model (a deep copy of the base) that apply traced
    peft: torch.nn.Module      # after apply and _perturb, eval mode
    untrained: torch.Tensor    # logits right after apply
    logits: torch.Tensor       # logits after _perturb
    trainable: dict[str, int]  # parameter name → numel, recorded right after apply


@pytest.fixture(scope="module")
def base() -> Base:
    model = _base_model()
    ids = M.ids(2, 5, vocab=VOCAB, seed=1)
    return Base(model, ids, _logits(model, ids), {k: v.clone() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module", params=METHOD_NAMES)
def applied(request, base) -> Applied:
    name = request.param
    cls = peftfx.METHODS[name]
    model = copy.deepcopy(base.model)     # apply freezes the weights it shares with the user's model
    try:
        peft = peftfx.apply(model, _config(cls), {"input_ids": base.ids})
    except Exception as e:
        pytest.fail(f"method {name!r}: its default config {cls.__name__}() does not apply to a small Llama "
                    f"({type(e).__name__}: {e}); fix the defaults or give {cls.__name__} a classmethod "
                    "conformance_example()", pytrace=False)
    trainable = {n: p.numel() for n, p in peft.named_parameters() if p.requires_grad}
    untrained = _logits(peft, base.ids)
    _perturb(peft)
    return Applied(name, cls, model, peft.eval(), untrained, _logits(peft, base.ids), trainable)


# ------------------------------------------------------------------------------------------ apply
def test_only_adapter_parameters_train(applied, base):
    adapters = applied.peft.peft_info.adapters
    assert sum(applied.trainable.values()) > 0, f"{applied.name}: no trainable parameters after apply"
    outside = [n for n in applied.trainable if _adapter_of(n, adapters) is None]
    assert not outside, f"{applied.name}: trainable parameters outside its adapter modules: {outside[:5]}"
    base_params = {n for n, _ in base.model.named_parameters()}
    leaked = [n for n, p in applied.peft.named_parameters() if n in base_params and p.requires_grad]
    assert not leaked, f"{applied.name}: base weights still require grad: {leaked[:5]}"
    assert adapters and all(r.method == applied.name for r in adapters.values())


def test_untrained_adapter_keeps_the_base_output(applied, base):
    if _is_graph_level(applied.cls):       # virtual tokens change the output; only its shape must hold
        assert applied.untrained.shape == base.logits.shape
    else:
        assert _max_diff(applied.untrained, base.logits) <= TOL_REORDER, \
            f"{applied.name}: output right after apply differs from the base model's"


def test_perturbed_adapter_is_live(applied, base):
    assert applied.logits.shape == base.logits.shape
    d = _max_diff(applied.logits, base.logits)
    assert d > LIVE, f"{applied.name}: perturbed adapters are {d:.2e} from the base model's logits"
    d = _max_diff(applied.logits, applied.untrained)    # the trainable parameters are really used
    assert d > LIVE, f"{applied.name}: perturbing the trainable parameters moves the logits by only {d:.2e}"


# ------------------------------------------------------------------------------------------ merge
def test_merge_and_unmerge(applied, base):
    peft, ids = applied.peft, base.ids
    mergeable = any(getattr(m, "mergeable", False) for m in peft.adapter_modules().values())
    merged = peftfx.merge(peft)
    assert _max_diff(_logits(merged, ids), applied.logits) <= TOL_REORDER, f"{applied.name}: merged != unmerged"
    if mergeable:
        assert _adapter_calls(merged) < _adapter_calls(peft), f"{applied.name}: merge left every adapter node"
    else:
        assert _adapter_calls(merged) == _adapter_calls(peft), f"{applied.name}: non-mergeable adapters went away"
    # a functional merge leaves the caller's model (and the user's weights it shares) exactly as it was
    assert _max_diff(_logits(peft, ids), applied.logits) == 0.0
    for k, v in applied.model.state_dict().items():
        assert torch.equal(v, base.state[k]), f"{applied.name}: merge changed the caller's weight {k}"
    restored = peftfx.unmerge(merged)
    assert _max_diff(_logits(restored, ids), applied.logits) <= TOL_REORDER, f"{applied.name}: unmerge output"
    assert _adapter_calls(restored) == _adapter_calls(peft)
    state = restored.state_dict()
    bad = {k: _max_diff(state[k], v) for k, v in base.state.items() if _max_diff(state[k], v) > TOL_EXACT}
    assert not bad, f"{applied.name}: base weights after merge → unmerge differ: {bad}"


def test_fold_equals_unfolded(applied, base):
    folded = peftfx.fold(applied.peft)
    assert _max_diff(_logits(folded, base.ids), applied.logits) <= TOL_REORDER
    assert _max_diff(_logits(applied.peft, base.ids), applied.logits) == 0.0    # fold is functional


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(applied, base, tmp_path):
    peftfx.save_adapter(applied.peft, tmp_path / "adapter")
    loaded = peftfx.load_adapter(copy.deepcopy(base.model), tmp_path / "adapter", example_inputs={"input_ids": base.ids})
    assert _max_diff(_logits(loaded, base.ids), applied.logits) <= TOL_EXACT


_CHILD = r"""
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
import peftfx
from tests import models as M

job = json.load(open(sys.argv[1]))
base_state = torch.load(job["base"])
ids = torch.load(job["ids"])
out = {"methods": sorted(peftfx.METHODS), "results": {}}
for name, d in job["adapters"].items():
    try:
        model = M.llama(**job["llama"])
        model.load_state_dict(base_state)
        pm = peftfx.load_adapter(model, d["path"], example_inputs={"input_ids": ids}).eval()
        with torch.no_grad():
            diff = (pm(input_ids=ids).logits - torch.load(d["expected"])).abs().max().item()
        out["results"][name] = {"max_abs": diff}
    except Exception as e:
        out["results"][name] = {"error": f"{type(e).__name__}: {e}"}
print("RESULT " + json.dumps(out))
"""


def test_a_fresh_process_loads_every_method(base, tmp_path):
    """Save an adapter of every registered method here, load them all in one new interpreter: the registry a
    fresh ``import peftfx`` builds knows every method without help from anything the tests imported."""
    job = {"base": str(tmp_path / "base.pt"), "ids": str(tmp_path / "ids.pt"), "adapters": {},
           "llama": dict(layers=2, hidden=32, inter=64, heads=4, kv_heads=2, vocab=VOCAB, seed=0)}
    torch.save(base.state, job["base"])
    torch.save(base.ids, job["ids"])
    for name in METHOD_NAMES:
        peft = peftfx.apply(copy.deepcopy(base.model), _config(peftfx.METHODS[name]), {"input_ids": base.ids})
        _perturb(peft)
        path = tmp_path / name
        peftfx.save_adapter(peft, path)
        torch.save(_logits(peft, base.ids), tmp_path / f"{name}.expected.pt")
        job["adapters"][name] = {"path": str(path), "expected": str(tmp_path / f"{name}.expected.pt")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "job.json"), root], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, f"child process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = json.loads(line[len("RESULT "):])
    assert out["methods"] == METHOD_NAMES, "a fresh `import peftfx` registers other methods than this process"
    bad = {n: r for n, r in out["results"].items() if "error" in r or r["max_abs"] > TOL_EXACT}
    assert not bad, f"loading in a fresh process failed or differs: {bad}"


# ------------------------------------------------------------------------------------------ export
def test_onnx_runtime_equals_eager(applied, base, tmp_path):
    merged = peftfx.merge(applied.peft)
    # optimize="none": ONNX Runtime's fusions are tests/export's subject; export_onnx still verifies in ORT
    report = peftfx.export_onnx(merged, tmp_path / f"{applied.name}.onnx", {"input_ids": base.ids}, optimize="none")
    x = M.ids(3, 7, vocab=VOCAB, seed=2)          # a shape unlike the traced example's
    ref = _logits(applied.peft, x).numpy()
    got = peftfx.Runtime(report.path).run(input_ids=x)["logits"]
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= TOL_ORT, f"{applied.name}: ONNX Runtime differs from eager"
