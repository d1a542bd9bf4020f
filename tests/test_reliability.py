"""Reliability: bad inputs and faults a careful user or an attacker would try (issue 11). Every one ends in a clear
``PeftfxError`` (or a documented, tested behaviour); nothing non-finite slips through; nothing hangs; nothing is
left behind. Classes: rule data, hyperparameters, non-finite values, denial of service, errors outside the family,
save paths, runtime inputs, leftovers, dropout mode — and the guarantees that already held (no pickle, no YAML
code, hostile safetensors headers, CLI user errors: exit 2 and one line). Plus a seeded hypothesis fuzz of rule data.

Kept fast: one tiny hand-written model, one ONNX export, one killed subprocess.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import peftfx
from peftfx import CheckpointError, ExportError, LoRA, PassError, RuleError, select
from peftfx._fs import PROCESS_START, clean_stale
from peftfx._saferegex import SafeRegex
from peftfx.cli import main
from peftfx.methods import rule_from_dict, rules_from_data
from peftfx.rules import MAX_DEPTH, selector_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


class Tiny(nn.Module):
    """Embedding → two linears; small enough that tracing takes about a second."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.l1 = nn.Linear(16, 16)
        self.drop = nn.Dropout(p)
        self.l2 = nn.Linear(16, 50)

    def forward(self, input_ids):
        return self.l2(self.drop(self.l1(self.emb(input_ids)).relu()))


def tiny():
    """CLI factory (``tests.test_reliability:tiny``)."""
    return {"model": Tiny().eval(), "example_inputs": {"input_ids": IDS}}


def _randomize(pm, scale=0.3):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in pm.adapter_modules().values():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return pm


@pytest.fixture(scope="module")
def peft():
    return _randomize(peftfx.apply(Tiny().eval(), LoRA(rank=2, alpha=4, targets=select.name("l1", "l2")),
                                   {"input_ids": IDS}))


def _site(key="model.layers.1.self_attn.q_proj", layer=1, roles=("attn.q",)):
    s = SimpleNamespace(key=key, module_type="Linear", op="linear", kind="linear", layer=layer, roles=set(roles))
    s.with_roles = lambda r: SimpleNamespace(**{**vars(s), "roles": set(r)})
    return s


# ------------------------------------------------------------------------------ 1. rule data, read strictly
BAD_SELECTORS = [
    {"all": False}, {"all": "yes"}, {"and": []}, {"or": []}, {"and": {"name": "x"}}, {"layer": "12"},
    {"layer": {}}, {"layer": True}, {"layer": [-1]}, {"layer": 1.5}, {"layer": {"start": 3, "stop": 2}},
    {"layer": {"stop": 4, "step": 2}}, {"name": 5}, {"name": ""}, {"name": []}, {"role": 5}, {"type": []},
    {"regex": 5}, {1: "x"}, {"name": "a", "role": "attn.q"}, [], {"nope": 1}, 7, None,
]


@pytest.mark.parametrize("data", BAD_SELECTORS, ids=[repr(d)[:40] for d in BAD_SELECTORS])
def test_bad_selector_data_is_a_rule_error_quoting_it(data):
    with pytest.raises(RuleError) as e:
        selector_from_dict(data)
    if isinstance(data, dict) and data:
        assert repr(next(iter(data))) in str(e.value) or repr(data)[:20] in str(e.value)
    # the same fragment inside a rule names the rule too
    with pytest.raises(RuleError, match="in rule"):
        rule_from_dict({"method": "lora", "targets": {"and": [{"role": "attn.q"}, data]}})


@pytest.mark.parametrize("make", [lambda: select.layer("12"), lambda: select.name(5), lambda: select.type(5),
                                  lambda: select.role(5), lambda: select.regex(None), lambda: select.layer([]),
                                  lambda: select.name("x") | "y"])
def test_bad_selectors_from_python_fail_when_made(make):
    with pytest.raises(RuleError):
        make()


def test_good_selector_data_still_round_trips():
    data = {"and": [{"or": [{"name": "q_proj"}, {"regex": r"model\.layers\.\d+\.mlp\..*"}]},
                    {"layer": {"start": 1, "stop": 3}}, {"not": {"type": "Embedding"}}, {"all": True}]}
    sel = selector_from_dict(data)
    assert selector_from_dict(json.loads(json.dumps(sel.to_dict()))) == sel
    assert sel.matches(_site("model.layers.1.self_attn.q_proj", 1)) and not sel.matches(_site(layer=3))


# ------------------------------------------------------------------------------ 2. hyperparameters
BAD_CONFIGS = [
    (peftfx.LoRA, {"alpha": float("nan")}, "finite"), (peftfx.LoRA, {"alpha": float("inf")}, "finite"),
    (peftfx.LoRA, {"alpha": -float("inf")}, "finite"), (peftfx.LoRA, {"alpha": "16"}, "finite number"),
    (peftfx.LoRA, {"rank": 2**31}, "limit"), (peftfx.LoRA, {"rank": 0}, "positive"),
    (peftfx.LoRA, {"rank": True}, "int"), (peftfx.LoRA, {"rank": 8.0}, "int"),
    (peftfx.LoRA, {"dropout": 1.0}, r"\[0, 1\)"), (peftfx.LoRA, {"dropout": float("nan")}, "finite"),
    (peftfx.LoRA, {"rslora": "yes"}, "true or false"), (peftfx.DoRA, {"alpha": float("nan")}, "finite"),
    (peftfx.VeRA, {"d_initial": float("inf")}, "finite"), (peftfx.VeRA, {"projection_prng_key": 2**70}, "seed"),
    (peftfx.Houlsby, {"bottleneck": 10**6}, "limit"), (peftfx.PTuning, {"encoder_dropout": float("nan")}, "finite"),
    (peftfx.PromptTuning, {"num_virtual_tokens": -1}, "positive"),
    (peftfx.PromptTuning, {"init_token_ids": (1, "a")}, "list of ints"),
]


@pytest.mark.parametrize("cls,kw,match", BAD_CONFIGS, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_CONFIGS])
def test_bad_hyperparameters_are_rule_errors(cls, kw, match):
    with pytest.raises(RuleError, match=match):
        cls(**kw)
    data = {"method": cls.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}}
    with pytest.raises(RuleError, match=match):          # the data form goes through the same checks
        rules_from_data(json.dumps([data]) if all(not isinstance(v, float) or math.isfinite(v) for v in kw.values())
                        else [data])


def test_nan_alpha_in_json_text_and_numpy_numbers():
    with pytest.raises(RuleError, match="alpha.*finite"):
        rules_from_data('[{"method": "lora", "alpha": NaN}]')
    rule = LoRA(rank=np.int64(4), alpha=np.float32(2.0))           # numpy scalars become Python numbers
    assert type(rule.rank) is int and type(rule.alpha) is float and json.dumps(rule.to_dict())


def _hf_folder(path, config):
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.l1.lora_A.weight": torch.zeros(2, 16),
               "base_model.model.l1.lora_B.weight": torch.zeros(16, 2)}, str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize("field,value", [("lora_alpha", float("nan")), ("r", 2**40), ("target_modules", 5),
                                         ("lora_alpha", "sixteen")])
def test_hf_config_values_are_validated_naming_the_file(tmp_path, field, value):
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["l1"], field: value}
    folder = _hf_folder(tmp_path / "hf", cfg)
    model = Tiny()
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "adapter_config.json"))):
        peftfx.load_adapter(model, folder, {"input_ids": IDS})
    assert all(p.requires_grad for p in model.parameters())        # untouched


# ------------------------------------------------------------------------------ 3. non-finite values
def test_load_adapter_refuses_nan_naming_the_tensor(peft, tmp_path):
    from safetensors.torch import load_file, save_file

    peftfx.save_adapter(peft, tmp_path / "a")
    f = str(tmp_path / "a" / "adapter.safetensors")
    state = load_file(f)
    key = sorted(state)[1]
    state[key][0, 0] = float("inf")
    save_file(state, f)
    with pytest.raises(CheckpointError, match=re.escape(key) + ".*NaN or infinite|NaN or infinite.*" + re.escape(key)):
        peftfx.load_adapter(Tiny(), tmp_path / "a", {"input_ids": IDS})


@pytest.mark.parametrize("inplace", [False, True])
def test_safe_merge_refuses_non_finite_weights_and_changes_nothing(peft, inplace):
    name = next(n for n in peft.adapter_modules() if ".l2." in n or n.startswith("l2"))
    B = peft.get_submodule(name).lora_B
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    saved = B.detach().clone()
    with torch.no_grad():
        B[0, 0] = float("nan")
    try:
        with pytest.raises(PassError, match=rf"{re.escape(name)}.*site l2.*nothing was merged"):
            peftfx.merge(peft, inplace=inplace)
        after = peft.state_dict()
        assert all(torch.equal(after[k], v) or (k.endswith("lora_B") and torch.isnan(after[k]).any())
                   for k, v in before.items())
        assert not any(r.merged for r in peft.peft_info.adapters.values())
        merged = peftfx.merge(peft, safe=False)                     # the documented way to write them anyway
        assert torch.isnan(merged.get_parameter("l2.weight")).any()
    finally:
        with torch.no_grad():
            B.copy_(saved)
    assert torch.isfinite(peftfx.merge(peft).get_parameter("l2.weight")).all()


# ------------------------------------------------------------------------------ 4. denial of service
def test_catastrophic_regex_does_not_hang_apply_or_inspect(peft):
    evil = LoRA(targets=select.regex(r"([a-z_.0-9]+)+X"))      # exponential in Python's re on every site key
    t = time.perf_counter()
    assert peftfx.inspect(peft, evil).to_dict()["rules"][0]["sites"] == []
    with pytest.raises(peftfx.NoMatchError):
        peftfx.apply(Tiny(), evil, {"input_ids": IDS})
    assert time.perf_counter() - t < 10
    keys = ["model.layers.17.self_attn.q_proj" * 4, "a" * 300]
    for pat in [r"([a-z_.0-9]+)+X", r"(a|a)*b", r"(a*)*b", r".*.*.*.*.*.*.*.*.*.*X"]:
        t = time.perf_counter()
        assert not any(SafeRegex(pat).fullmatch(k) for k in keys)
        assert time.perf_counter() - t < 0.5, pat


@pytest.mark.parametrize("pat,what", [(r"(a)\1", "backreferences"), (r"(?=a)a", "lookahead"),
                                      (r"a++", "possessive"), (r"(?>a)", "atomic"), ("(", "bad regex"),
                                      ("(a{100}){100}", "too large"), ("a" * 2000, "longer")])
def test_regexes_that_need_backtracking_or_are_huge_are_refused(pat, what):
    with pytest.raises(RuleError, match=what):
        select.regex(pat)


def test_safe_regex_agrees_with_re():
    pats = [r"model\.layers\.1\.mlp\.(up|down)_proj", r"(?:.*?\.)?(?:layers|h)\.(?:0|1)\..*", r"(.*\.)?(q_proj)",
            r"(a|ab)*c", r"(?i)Q_PROJ", r"[^.]*\.[a-z]+", r"\w+\.\d{1,2}", r"x{2,4}y?", r"^ab$", r"\bab\b",
            r"a\Bb", r"(a|)+b", r"(?s).", r"\Aab\Z", r"(?i)[^a]b", r"(?a)\w+", r"[a-c\d]+?z*?", r"a{,3}b"]
    texts = ["", "a", "ab", "abc", "aab", "ac", "ababc", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_proj",
             "x.h.0.attn", "q_proj", "a.q_proj", "Q_PROJ", "xxxxy", "xxxxxy", "a\n", "ab\n", "Ab", "bb", "éa",
             "abz", "12z", "foo.12", "foo.123", "aaab", "b"]
    for p in pats:
        s = SafeRegex(p)
        assert [s.fullmatch(t) for t in texts] == [re.fullmatch(p, t) is not None for t in texts], p


def test_deep_nesting_is_a_rule_error_not_a_recursion_error():
    data = {"name": "x"}
    for _ in range(5000):
        data = {"not": data}
    with pytest.raises(RuleError, match="deep"):
        selector_from_dict(data)
    sel = select.name("x")
    with pytest.raises(RuleError, match="deep"):
        for _ in range(MAX_DEPTH + 1):
            sel = ~sel
    wide = select.name("n0")
    for i in range(1, 3000):                      # chains flatten: a | b | c … is one "or", not 3000 levels
        wide = wide | select.name(f"n{i}")
    assert wide.depth == 2 and len(wide.to_dict()["or"]) == 3000
    with pytest.raises(RuleError, match="nests too deeply"):
        rules_from_data("[" * 100_000 + "]" * 100_000)


def test_yaml_alias_bomb_is_refused():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    bomb += "rules: [{method: lora, targets: *i}]\n"
    t = time.perf_counter()
    with pytest.raises(RuleError, match="entries"):
        rules_from_data(bomb)
    assert time.perf_counter() - t < 5


# ------------------------------------------------------------------------------ 5. errors inside the family
@pytest.mark.parametrize("text,kind", [("a: b: c", "ScannerError"), ("[{method: lora}", "ParserError"),
                                       ("- !!python/object/apply:os.system ['echo pwned']", "ConstructorError"),
                                       ("- \x00", "ReaderError")])
def test_yaml_errors_are_rule_errors(tmp_path, text, kind):
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    with pytest.raises(RuleError, match=kind):
        rules_from_data(str(f))
    with pytest.raises(RuleError, match=kind):
        rules_from_data(text)


def test_yaml_python_tags_never_run(tmp_path):
    marker = tmp_path / "ran"
    text = f"- !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(RuleError):
        rules_from_data(text)
    assert not marker.exists()


def test_rule_paths_that_are_folders_binary_or_missing(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    for arg, match in [(tmp_path / "d.yaml", "is a folder"), (tmp_path / "bin.json", "not UTF-8"),
                       (str(tmp_path / "missing.yaml"), "not found")]:
        with pytest.raises(RuleError, match=match):
            rules_from_data(arg)


@pytest.mark.parametrize("config", [[1, 2], 5, "text", {"format": "peftfx-adapter/1"},
                                    {"format": "peftfx-adapter/1", "rules": "lora"},
                                    {"format": "peftfx-adapter/1", "rules": [{"method": "lora", "rank": "8"}]}])
def test_bad_adapter_config_shapes_name_the_file(peft, tmp_path, config):
    folder = tmp_path / "a"
    peftfx.save_adapter(peft, folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "adapter_config.json"))):
        peftfx.load_adapter(Tiny(), folder, {"input_ids": IDS})


# ------------------------------------------------------------------------------ 6. save paths
def test_save_under_a_file_or_onto_a_file_names_the_real_path(peft, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "file")) + ".* is a file") as e:
        peftfx.save_adapter(peft, tmp_path / "file" / "sub" / "adapter")
    assert ".peftfx-tmp" not in str(e.value)
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        peftfx.save_adapter(peft, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["file"]
    with pytest.raises(ExportError, match=r"is a file"):
        peftfx.export_onnx(peft, tmp_path / "file" / "m.onnx", {"input_ids": IDS})


@pytest.mark.parametrize("path", ["", 5, b"adapter", None])
def test_save_and_load_need_a_path(peft, path):
    with pytest.raises(CheckpointError, match="path"):
        peftfx.save_adapter(peft, path)
    with pytest.raises(CheckpointError, match="path|folder"):
        peftfx.load_adapter(Tiny(), path, {"input_ids": IDS})


def test_save_into_a_place_nobody_can_write(peft):
    with pytest.raises(CheckpointError, match=r"cannot write the adapter to /proc/peftfx-test/adapter: ") as e:
        peftfx.save_adapter(peft, "/proc/peftfx-test/adapter")
    assert ".peftfx-tmp" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_save_into_an_unwritable_folder(peft, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(ro / 'adapter'))}.*no permission"):
            peftfx.save_adapter(peft, ro / "adapter")
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------------------ 7. runtime inputs
@pytest.fixture(scope="module")
def gather_onnx(tmp_path_factory):
    """``input_ids [batch, sequence]`` (int64) → Gather over a [10, 4] table; ``scale [1]`` (float)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
         helper.make_node("Gather", ["table", "ids32"], ["emb"]), helper.make_node("Mul", ["emb", "scale"], ["out"])],
        "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", 4])], [table])
    path = tmp_path_factory.mktemp("rt") / "g.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8                   # what every supported ONNX Runtime reads
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("feeds,match", [
    ({"input_ids": np.array([[1.7, 2.0]]), "scale": [1.0]}, "dtype float64.*int64.*not converted silently"),
    ({"input_ids": np.array([1, 2]), "scale": [1.0]}, r"1 dimension\(s\).*takes 2"),
    ({"input_ids": np.array([[1, 10]]), "scale": [1.0]}, r"token id 10, outside .*\[0, 10\)"),
    ({"input_ids": np.array([[-1, 2]]), "scale": [1.0]}, "token id -1"),
    ({"input_ids": np.array([[1]]), "scale": [1.0], "extra": [1]}, "no input 'extra'"),
    ({"input_ids": np.array([[1]])}, r"missing input\(s\) \['scale'\]"),
    ({"input_ids": np.array([[1]]), "scale": [1.0, 2.0]}, "takes exactly 1"),
    ({"input_ids": [[1, 2], [3]], "scale": [1.0]}, "cannot be made into an array"),
    ({"input_ids": np.array([["a"]]), "scale": [1.0]}, "dtype <U1"),
    ({"input_ids": np.array([[2**40]]), "scale": [1.0]}, "token id"),
])
def test_runtime_checks_inputs_before_onnx_runtime(gather_onnx, feeds, match):
    rt = peftfx.Runtime(gather_onnx)
    with pytest.raises(ExportError, match=match):
        rt.run(feeds)


def test_runtime_accepts_what_converts_exactly(gather_onnx):
    rt = peftfx.Runtime(gather_onnx)
    assert rt.vocab == {"input_ids": 10}
    out = rt.run({"input_ids": np.array([[1, 9]], dtype=np.int32), "scale": np.array([2], dtype=np.int64)})["out"]
    assert out.tolist() == [[[8, 10, 12, 14], [72, 74, 76, 78]]]
    assert rt.run(input_ids=torch.tensor([[3]]), scale=[1.0])["out"].shape == (1, 1, 4)
    with pytest.raises(ExportError, match="takes a dict"):
        rt.run([np.array([[1]])])


def test_cli_run_errors_are_one_line_exit_2(gather_onnx, capsys):
    for argv in (["run", str(gather_onnx), "--ids", "1 99"], ["run", str(gather_onnx), "--ids", "1.5 2"],
                 ["run", str(gather_onnx), "--ids", "1 99999999999999999999999"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("peftfx: error:") and "unexpected" not in err, err


# ------------------------------------------------------------------------------ 8. leftovers, permissions
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _backdate(path) -> None:
    old = PROCESS_START - 3600
    os.utime(path, (old, old))


def test_killed_save_leaves_only_what_the_next_save_cleans(peft, tmp_path):
    """kill -9 in the middle of ``save_adapter`` (a slow tensor write held open), then save again: the partial
    temporary folder is gone, the destination is complete, user files with similar names are untouched."""
    dest = tmp_path / "adapter"
    code = f"""
import sys, time, torch, safetensors.torch as st
from peftfx.io.folder import write_folder
def slow(state, path, metadata=None):
    open(path, "wb").write(b"partial")
    print("writing", flush=True)
    time.sleep(60)
st.save_file = slow
write_folder({str(dest)!r}, {{"adapter.safetensors": {{"x": torch.zeros(2)}}}}, {{"c.json": {{}}}}, {{}})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [n for n in os.listdir(tmp_path) if n.startswith(".peftfx-tmp-")]
    assert len(left) == 1 and not dest.exists()              # the interruption left a temp, never a partial dest
    _backdate(tmp_path / left[0])                             # as the next run would see it: older than itself
    legacy = tmp_path / ".peftfx-tmp-abcd1234"                # the name older peftfx versions used
    legacy.mkdir()
    _backdate(legacy)
    keep = [tmp_path / ".peftfx-tmp-mine", tmp_path / "notes.peftfx-old.txt", tmp_path / ".peftfx-tmp-abcd1234x",
            tmp_path / f".peftfx-tmp-p{os.getpid()}-abcd1234"]      # user data, or ours (a live process)
    for k in keep:
        k.mkdir()
        _backdate(k)
    peftfx.save_adapter(peft, dest)
    names = set(os.listdir(tmp_path))
    assert names == {"adapter"} | {k.name for k in keep}
    umask = os.umask(0o022)
    os.umask(umask)
    assert (dest.stat().st_mode & 0o777) == 0o777 & ~umask                      # not mkdtemp's 0700
    assert all((f.stat().st_mode & 0o777) == 0o666 & ~umask for f in dest.iterdir())


def test_interrupted_swap_is_restored_not_deleted(peft, tmp_path):
    """A writer that died between the two renames left ``adapter.peftfx-old`` and no ``adapter``: the previous
    version is renamed back rather than removed."""
    peftfx.save_adapter(peft, tmp_path / "adapter")
    os.rename(tmp_path / "adapter", tmp_path / f"adapter.peftfx-old-p{_dead_pid()}-abcd1234")
    _backdate(tmp_path / os.listdir(tmp_path)[0])
    assert clean_stale(str(tmp_path))
    assert os.listdir(tmp_path) == ["adapter"] and (tmp_path / "adapter" / "adapter.safetensors").is_file()


def test_export_cleans_stale_export_leftovers(peft, tmp_path):
    stale = tmp_path / f".peftfx-export-p{_dead_pid()}-abcd1234"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"partial onnx")
    live = tmp_path / f".peftfx-export-p{os.getpid()}-zzzz9999"
    live.mkdir()
    for d in (stale, live):
        _backdate(d)
    report = peftfx.export_onnx(peft, tmp_path / "model.onnx", {"input_ids": IDS})
    assert sorted(os.listdir(tmp_path)) == sorted(["model.onnx", live.name])
    assert report.checks


# ------------------------------------------------------------------------------ 9. dropout follows the mode
def test_adapter_dropout_is_off_on_a_model_applied_in_eval_mode(tmp_path):
    pm = _randomize(peftfx.apply(Tiny().eval(), LoRA(rank=4, dropout=0.5, targets=select.name("l1")),
                                 {"input_ids": IDS}))
    assert not pm.training and not any(m.training for m in pm.modules())
    with torch.no_grad():
        assert torch.equal(pm(input_ids=IDS), pm(input_ids=IDS))
    peftfx.save_adapter(pm, tmp_path / "a")
    loaded = peftfx.load_adapter(Tiny().eval(), tmp_path / "a", {"input_ids": IDS})
    assert not any(m.training for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS), pm(input_ids=IDS))
    pm.train()
    assert all(m.training for m in pm.adapter_modules().values())
    with torch.no_grad():
        assert not torch.equal(pm(input_ids=IDS), pm(input_ids=IDS))       # dropout is on in train mode


# ------------------------------------------------------------------------------ guarantees that already held
def test_pickle_is_never_loaded(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["l1"]}))
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Evil(str(marker)))
    (folder / "adapter_model.bin").write_bytes(evil)
    with pytest.raises(CheckpointError, match="pickle"):
        peftfx.load_adapter(Tiny(), folder, {"input_ids": IDS})
    peft_folder = tmp_path / "peftfx"                   # a pickle where a peftfx adapter's tensors belong
    peft_folder.mkdir()
    (peft_folder / "adapter_config.json").write_text(json.dumps({"format": "peftfx-adapter/1",
                                                                 "rules": [{"method": "lora"}]}))
    (peft_folder / "adapter.safetensors").write_bytes(evil)
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        peftfx.load_adapter(Tiny(), peft_folder, {"input_ids": IDS})
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("header", [b"{not json", json.dumps({"x": {"dtype": "F32", "shape": [4],
                                                                     "data_offsets": [0, 10**12]}}).encode(),
                                    json.dumps({"x": {"dtype": "F32", "shape": [10**9, 10**9],
                                                      "data_offsets": [0, 16]}}).encode()])
def test_hostile_safetensors_headers_are_refused(peft, tmp_path, header):
    folder = tmp_path / "a"
    peftfx.save_adapter(peft, folder)
    (folder / "adapter.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        peftfx.load_adapter(Tiny(), folder, {"input_ids": IDS})


def test_hostile_safetensors_header_length(peft, tmp_path):
    folder = tmp_path / "a"
    peftfx.save_adapter(peft, folder)
    (folder / "adapter.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        peftfx.load_adapter(Tiny(), folder, {"input_ids": IDS})


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "bad.yaml").write_text("- method: lora\n  alpha: .nan\n")
    (tmp_path / "tags.yaml").write_text("- !!python/name:os.system\n")
    (tmp_path / "d.json").mkdir()
    spec = "tests.test_reliability:tiny"
    for argv in (["inspect", spec, "--rules", str(tmp_path / "bad.yaml")],
                 ["inspect", spec, "--rules", str(tmp_path / "tags.yaml")],
                 ["inspect", spec, "--rules", str(tmp_path / "d.json")],
                 ["inspect", "tests.test_reliability:nothing"],
                 ["merge-export", spec, "--adapter", str(tmp_path / "none"), "-o", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("peftfx: error:") and "unexpected" not in err, err
    assert "m.onnx" not in os.listdir(tmp_path)


# ------------------------------------------------------------------------------ fuzz: rule data
def test_fuzz_rule_data_is_a_selector_or_a_rule_error():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from(["name", "regex", "type", "layer", "role", "all", "and", "or", "not", "start", "stop",
                            "method", "rank", "alpha", "x"])
    leaves = (st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True)
              | st.sampled_from(["q_proj", "*.mlp.*", "attn.*", "attn.q", "Linear", r"(a+)+$", "(", "", "[", "mlp.up"]))
    data = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(keys, inner, max_size=3), max_leaves=20)
    sites = [_site(), _site("model.layers.0.mlp.up_proj", 0, ("mlp.up",)), _site("lm_head", None, ("head",))]

    @settings(max_examples=100, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data)
    def check(d):
        try:
            sel = selector_from_dict(d)
        except RuleError:
            pass
        else:
            assert selector_from_dict(sel.to_dict()) == sel
            [sel.matches(s) for s in sites]
        try:
            rule = rule_from_dict({"method": "lora", "targets": d} if not isinstance(d, dict) or "method" not in d
                                  else d)
        except RuleError:
            pass
        else:
            assert rules_from_data(json.loads(json.dumps(rule.to_dict())))[0] == rule

    check()
